"""`imgprep snapshot`: enqueue imgprep.snapshot, optionally wait for the image."""

from __future__ import annotations

import json
import sys

import click
from pydantic import ValidationError

from domain.core.errors import ImgprepError
from domain.core.snapshot_models import ConvertedImage, SnapshotRequest
from worker.cli import EXIT_FAILED, EXIT_USAGE, main, unprivileged
from worker.sizes import human


@main.command()
@click.argument("instance_id")
@click.argument("target")
@click.option("--disk-name", default="disk", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw"]), default="qcow2")
@click.option("--compress", is_flag=True, help="Compressed qcow2 clusters.")
@click.option("--host", default=None, help="Host that holds the instance disk.")
@click.option("--wait/--no-wait", default=False, help="Block until the image is written.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@unprivileged
def snapshot(
    *,
    instance_id: str,
    target: str,
    disk_name: str,
    fmt: str,
    compress: bool,
    host: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Extract INSTANCE_ID's disk to TARGET (a path under the snapshots directory)."""
    from worker.taskbase import describe_validation

    try:
        request = SnapshotRequest.model_validate(
            {
                "instance_id": instance_id,
                "disk_name": disk_name,
                "target": target,
                "format": fmt,
                "compress": compress,
                "host": host,
            }
        )
    except ValidationError as error:
        click.echo(f"imgprep: {describe_validation(error)}", err=True)
        sys.exit(EXIT_USAGE)
    from worker.client import Client

    result = Client().send("imgprep.snapshot", request.model_dump(mode="json"))
    if not wait:
        click.echo(json.dumps({"task_id": result.id}) if as_json else result.id)
        return
    try:
        image = ConvertedImage.model_validate(result.get(timeout=timeout, propagate=True))
    except ImgprepError as error:
        click.echo(f"imgprep: snapshot failed: {type(error).__name__}: {error}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json.dumps({"task_id": result.id, **image.model_dump(mode="json")}, indent=2))
    else:
        click.echo(f"image   {image.path} ({image.format}, {human(image.virtual_size)} virtual)")
        click.echo(f"sha256  {image.sha256}")
        click.echo(f"task    {result.id}")
