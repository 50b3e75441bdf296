"""Instance disks as copy-on-write qcow2 overlays on a cached base (Nova's `Qcow2.create_image`).

The overlay is created at `<instances_dir>/<instance_id>/<disk_name>` with the base as backing
file and the requested virtual size, under the lease `disk:<instance_id>/<disk_name>`. A base
larger than the requested size is refused (Nova's FlavorDiskTooSmall). An overlay that is
already there with the same backing file and size is the answer; one with another is a conflict.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from tasks import qemu_img
from tasks.errors import DiskConflict, DiskTooSmall
from tasks.models import CachedImage, DiskSpec, InstanceDisk
from tasks.paths import instance_dir
from tasks.ports import LockFactory
from tasks.publish import Staged, publish_once
from tasks.runner import Limits, Runner

log = structlog.get_logger(__name__)


def verify_base_size(base: CachedImage, spec: DiskSpec) -> None:
    """Refuse a disk smaller than its base: images cannot be shrunk."""
    if base.virtual_size > spec.size_bytes:
        raise DiskTooSmall(
            f"image {base.image_id} has a virtual size of {base.virtual_size} bytes, larger than "
            f"the requested disk of {spec.size_bytes} bytes; ask for at least {base.virtual_size}"
        )


def disk_lock_name(spec: DiskSpec) -> str:
    return f"disk:{spec.instance_id}/{spec.disk_name}"


def create_overlay(
    base: CachedImage,
    spec: DiskSpec,
    *,
    instances_dir: Path,
    host: str,
    runner: Runner,
    locks: LockFactory,
    limits: Limits,
) -> InstanceDisk:
    """Make sure the qcow2 overlay of `spec` on `base` exists and return it."""
    verify_base_size(base, spec)
    path = instance_dir(instances_dir, spec.instance_id, create=True) / spec.disk_name
    wanted = InstanceDisk(
        host=host,
        instance_id=spec.instance_id,
        disk_name=spec.disk_name,
        path=str(path),
        format="qcow2",
        virtual_size=spec.size_bytes,
        backing_file=base.path,
        backing_format=base.format,
    )

    def find() -> InstanceDisk | None:
        if not path.exists():
            return None
        existing = qemu_img.info(runner, path, "qcow2", limits)
        if existing.backing_filename != base.path or existing.virtual_size != spec.size_bytes:
            raise DiskConflict(
                f"{path} already exists with backing file {existing.backing_filename} and "
                f"{existing.virtual_size} bytes; the request wants {base.path} and "
                f"{spec.size_bytes} bytes. Delete the disk first to recreate it"
            )
        return wanted

    def stage(part: Path) -> Staged[InstanceDisk]:
        qemu_img.create_overlay(
            runner, part, backing=Path(base.path), backing_format=base.format, size=spec.size_bytes
        )
        log.info("overlay_created", path=str(path), size=spec.size_bytes)
        return Staged(file=part, result=wanted)

    return publish_once(path, find=find, lease=locks(disk_lock_name(spec)), stage=stage)
