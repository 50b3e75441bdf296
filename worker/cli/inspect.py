"""`imgprep inspect`: is this image file safe to use, and as what?

The same checks a worker runs on a download: the format inspector on the bytes, then
`qemu-img info` with the detected format pinned, under the configured limits. Exit 0 when the
image is safe to use as --format (or as what it is), 1 with a one-line reason on stderr when it
is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from domain.core.errors import ImageRefused
from worker.cli import EXIT_FAILED, main, unprivileged
from worker.cli.sizes import human
from worker.settings import get_settings


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "declared",
    type=click.Choice(["auto", "raw", "qcow2", "vmdk"]),
    default="auto",
    show_default=True,
    help="The format the image is meant to be; refused if its bytes are another.",
)
@click.option("--json", "as_json", is_flag=True, help="Print format, size and verdict as JSON.")
@unprivileged
def inspect(file: Path, declared: str, as_json: bool) -> None:
    """Check FILE as imgprep checks every image before qemu-img opens it."""
    from domain.core.runner import Limits, Runner
    from domain.formats import qemu_img
    from domain.formats.inspection import detected_format, inspect_image, verify_info

    settings = get_settings().qemu
    runner = Runner(default_timeout=settings.command_timeout_seconds)
    limits = Limits(
        cpu_seconds=settings.info_cpu_seconds,
        address_space_bytes=settings.info_address_space_bytes,
    )
    try:
        inspected = inspect_image(file, declared)
        info = qemu_img.info(runner, file, inspected.format, limits)
        verify_info(info, inspected)
    except ImageRefused as error:
        if as_json:
            _print_json(file, detected_format(file), None, "refused", str(error))
        click.echo(f"imgprep: {file} refused: {error}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        _print_json(file, info.format, info.virtual_size, "safe", None)
    else:
        click.echo(f"{file}: {info.format}, {human(info.virtual_size)} virtual, safe to use")


def _print_json(
    file: Path, fmt: str | None, virtual_size: int | None, verdict: str, reason: str | None
) -> None:
    report = {
        "path": str(file),
        "format": fmt,
        "virtual_size": virtual_size,
        "verdict": verdict,
        "reason": reason,
    }
    click.echo(json.dumps(report, indent=2))
