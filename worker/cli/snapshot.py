"""`imgprep snapshot`: enqueue imgprep.snapshot, optionally wait for the image."""

from __future__ import annotations

import json
import sys

import click

from domain.core.errors import ImgprepError
from domain.formats.snapshot_models import ConvertedImage, RbdSnapshot, SnapshotRequest
from worker.cli import EXIT_FAILED, main, request_or_exit, unprivileged
from worker.cli.sizes import human


@main.command()
@click.argument("instance_id")
@click.argument("target", required=False)
@click.option("--disk-name", default="disk", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw"]), default="qcow2")
@click.option("--compress", is_flag=True, help="Compressed qcow2 clusters.")
@click.option("--host", default=None, help="Host that holds the instance disk.")
@click.option(
    "--backend",
    type=click.Choice(["file", "rbd"]),
    default="file",
    show_default=True,
    help="file: a disk on the host; rbd: a clone in the host's Ceph cluster.",
)
@click.option(
    "--direct",
    is_flag=True,
    help="rbd: snapshot into the cluster's images pool (flattened, protected) instead of "
    "extracting TARGET; needs --image-id.",
)
@click.option("--image-id", default=None, help="--direct: the new image's id.")
@click.option("--wait/--no-wait", default=False, help="Block until the image is written.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@unprivileged
def snapshot(
    *,
    instance_id: str,
    target: str | None,
    disk_name: str,
    fmt: str,
    compress: bool,
    host: str | None,
    backend: str,
    direct: bool,
    image_id: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Extract INSTANCE_ID's disk to TARGET (a path under the snapshots directory); with
    --backend rbd --direct, snapshot it into the Ceph cluster's images pool instead."""
    request = request_or_exit(
        SnapshotRequest,
        {
            "instance_id": instance_id,
            "disk_name": disk_name,
            "target": target,
            "format": fmt,
            "compress": compress,
            "host": host,
            "backend": "rbd" if backend == "rbd" else None,
            "method": "direct" if direct else "extract",
            "image_id": image_id,
        },
    )
    from worker.cli.client import Client

    result = Client().send("imgprep.snapshot", request.model_dump(mode="json"))
    if not wait:
        click.echo(json.dumps({"task_id": result.id}) if as_json else result.id)
        return
    try:
        answer = result.get(timeout=timeout, propagate=True)
    except ImgprepError as error:
        click.echo(f"imgprep: snapshot failed: {type(error).__name__}: {error}", err=True)
        sys.exit(EXIT_FAILED)
    if request.method == "direct":
        made = RbdSnapshot.model_validate(answer)
        if as_json:
            click.echo(json.dumps({"task_id": result.id, **made.model_dump(mode="json")}, indent=2))
        else:
            click.echo(f"image   {made.location} ({human(made.virtual_size)} virtual)")
            click.echo(f"task    {result.id}")
        return
    image = ConvertedImage.model_validate(answer)
    if as_json:
        click.echo(json.dumps({"task_id": result.id, **image.model_dump(mode="json")}, indent=2))
    else:
        click.echo(f"image   {image.path} ({image.format}, {human(image.virtual_size)} virtual)")
        click.echo(f"sha256  {image.sha256}")
        click.echo(f"task    {result.id}")
