"""`imgprep precache`: enqueue imgprep.precache, optionally wait with a progress bar per host."""

from __future__ import annotations

import json
import sys

import click

from domain.cache.precache_models import PrecacheReport, PrecacheRequest
from worker.cli import EXIT_FAILED, main, request_or_exit, unprivileged
from worker.cli.watch import follow


@main.command()
@click.argument("image_url")
@click.option("--image-id", required=True, help="Image id; the cache key is a hash of it.")
@click.option("--checksum", default=None, help="sha256:HEX of the image as served.")
@click.option(
    "--format",
    "declared_format",
    type=click.Choice(["auto", "raw", "qcow2", "vmdk"]),
    default="auto",
    show_default=True,
    help="The image's format as the image service declares it; refused if the bytes differ.",
)
@click.option("--hosts", default=None, help="Comma-separated host ids; default: every live host.")
@click.option("--wait/--no-wait", default=False, help="Block until every host has the image.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@unprivileged
def precache(
    *,
    image_url: str,
    image_id: str,
    checksum: str | None,
    declared_format: str,
    hosts: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Put IMAGE_URL into the cache of the hosts before instances ask for it."""
    request = request_or_exit(
        PrecacheRequest,
        {
            "images": [
                {
                    "url": image_url,
                    "image_id": image_id,
                    "checksum": checksum,
                    "declared_format": declared_format,
                }
            ],
            "hosts": [h.strip() for h in hosts.split(",") if h.strip()] if hosts else None,
        },
    )
    from worker.cli.client import Client

    client = Client()
    result = client.send("imgprep.precache", request.model_dump(mode="json"))
    if not wait:
        click.echo(json.dumps({"task_id": result.id}) if as_json else result.id)
        return
    follow(result.id, as_json=as_json, timeout=timeout)
    try:
        report = PrecacheReport.model_validate(result.get(timeout=timeout))
    except Exception as error:  # a timeout, a lost broker: the operation's state is unknown
        if as_json:
            click.echo(json.dumps({"task_id": result.id, "error": str(error)}))
        click.echo(f"imgprep: precache did not finish: {type(error).__name__}: {error}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json.dumps({"task_id": result.id, **report.model_dump(mode="json")}, indent=2))
    else:
        for outcome in report.results:
            line = f"{outcome.host:<24} {outcome.image_id:<24} {outcome.outcome}"
            if outcome.error_class:
                line += f"  {outcome.error_class}: {outcome.error_message}"
            click.echo(line)
        click.echo(f"task  {result.id}")
    if any(outcome.outcome == "failed" for outcome in report.results):
        sys.exit(EXIT_FAILED)
