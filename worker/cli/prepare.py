"""`imgprep prepare`: enqueue imgprep.prepare_disk, optionally wait for the disk."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from domain.core.errors import ImgprepError
from domain.core.models import PrepareRequest
from worker.cli import EXIT_FAILED, SizeType, main, request_or_exit, unprivileged
from worker.cli.injection import InjectionType, PartitionType
from worker.cli.sizes import human
from worker.cli.watch import follow


@main.command()
@click.argument("image_url")
@click.option("--image-id", required=True, help="Image id; the cache key is a hash of it.")
@click.option("--instance", "instance_id", required=True, help="Instance id (a path-safe name).")
@click.option(
    "--size", "size_bytes", required=True, type=SizeType(), help="Disk size: 10G, 512M, bytes."
)
@click.option("--disk-name", default="disk", show_default=True)
@click.option("--checksum", default=None, help="sha256:HEX of the image as served.")
@click.option("--host", default=None, help="Host whose queue runs the host-local steps.")
@click.option(
    "--backend",
    type=click.Choice(["qcow2", "raw", "rbd"]),
    default="qcow2",
    show_default=True,
    help="Instance disk: a qcow2 overlay on the cached base, a sparse raw copy of it, or a "
    "clone in the host's Ceph cluster of the image imported there once (rbd.*).",
)
@click.option(
    "--format",
    "declared_format",
    type=click.Choice(["auto", "raw", "qcow2", "vmdk"]),
    default="auto",
    show_default=True,
    help="The image's format as the image service declares it; refused if the bytes differ.",
)
@click.option("--wait/--no-wait", default=False, help="Block until the disk is ready.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--inject",
    "inject",
    multiple=True,
    type=InjectionType(),
    help="Write LOCAL_FILE into the guest at GUEST_PATH (its mode too); repeatable.",
)
@click.option(
    "--partition",
    default="auto",
    show_default=True,
    type=PartitionType(),
    help="Guest filesystem for --inject: a partition number, auto, or none (whole disk).",
)
@unprivileged
def prepare(
    *,
    image_url: str,
    image_id: str,
    instance_id: str,
    size_bytes: int,
    disk_name: str,
    checksum: str | None,
    host: str | None,
    backend: str,
    declared_format: str,
    wait: bool,
    timeout: float,
    as_json: bool,
    inject: tuple[dict[str, Any], ...],
    partition: object,
) -> None:
    """Fetch IMAGE_URL into the cache and create an instance disk on it."""
    request = request_or_exit(
        PrepareRequest,
        {
            "image": {
                "url": image_url,
                "image_id": image_id,
                "checksum": checksum,
                "declared_format": declared_format,
            },
            "disk": {
                "instance_id": instance_id,
                "disk_name": disk_name,
                "size_bytes": size_bytes,
                "backend": backend,
            },
            "host": host,
            "inject": list(inject),
            "partition": partition,
        },
    )
    from worker.cli.client import Client

    client = Client()
    result = client.prepare_disk(request)
    if not wait:
        click.echo(json.dumps({"task_id": result.id}) if as_json else result.id)
        return
    follow(result.id, as_json=as_json, timeout=timeout)
    try:
        prepared = client.wait_prepared(result, timeout=timeout)
    except ImgprepError as error:
        _fail(f"prepare failed: {type(error).__name__}: {error}", as_json, result.id, error)
    except Exception as error:  # a timeout, a lost broker: the operation's state is unknown
        _fail(f"prepare did not finish: {type(error).__name__}: {error}", as_json, result.id, error)
    if as_json:
        click.echo(json.dumps({"task_id": result.id, **prepared.model_dump(mode="json")}, indent=2))
    else:
        disk, base = prepared.disk, prepared.base
        click.echo(f"disk  {disk.path} ({disk.format}, {human(disk.virtual_size)})")
        click.echo(
            f"base  {base.path} ({base.format}, {human(base.virtual_size)}, image {base.image_id})"
        )
        for item in prepared.injected:
            click.echo(f"file  {item.path} ({item.size} bytes, mode {item.mode:04o})")
        click.echo(f"task  {result.id}")


def _fail(message: str, as_json: bool, task_id: str, error: BaseException) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {"task_id": task_id, "error_type": type(error).__name__, "error": str(error)}
            )
        )
    click.echo(f"imgprep: {message}", err=True)
    sys.exit(EXIT_FAILED)
