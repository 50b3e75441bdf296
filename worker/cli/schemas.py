"""`imgprep schemas`: write (or check) the JSON Schemas of the wire contract in schemas/."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from worker.app.wire_schemas import REPO_SCHEMAS, drift, write
from worker.cli import EXIT_FAILED, main


@main.command()
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO_SCHEMAS,
    show_default=True,
    help="Directory of the schema files.",
)
@click.option("--check", is_flag=True, help="Write nothing; fail when the files are not current.")
def schemas(output: Path, check: bool) -> None:
    """Generate the JSON Schema of every request and result model, and operations.json."""
    if check:
        stale = drift(output)
        if stale:
            click.echo(f"imgprep: schemas out of date: {', '.join(stale)}", err=True)
            sys.exit(EXIT_FAILED)
        click.echo(f"schemas in {output} are current")
        return
    for path in write(output):
        click.echo(f"wrote {path}")
