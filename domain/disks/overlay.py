"""Instance disks as copy-on-write qcow2 overlays on a cached base (Nova's `Qcow2.create_image`).

The overlay is created at `<instances_dir>/<instance_id>/<disk_name>` with the base as backing
file and the requested virtual size, under the lease `disk:<instance_id>/<disk_name>`. A base
larger than the requested size is refused (Nova's FlavorDiskTooSmall). An overlay that is
already there with the same backing file and size is the answer; one with another is a conflict.
Its format is recorded in disk.info before it appears under its name.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from domain.core.errors import DiskConflict, DiskTooSmall
from domain.core.models import CachedImage, DiskFormat, DiskSpec, InstanceDisk
from domain.core.paths import instance_dir
from domain.core.ports import LockFactory
from domain.core.publish import Staged, publish_once
from domain.core.runner import Limits, Runner
from domain.disks import diskinfo
from domain.disks.preallocation import preallocate
from domain.formats import qemu_img

log = structlog.get_logger(__name__)


def verify_base_size(base: CachedImage, spec: DiskSpec) -> None:
    """Refuse a disk smaller than its base: images cannot be shrunk."""
    if base.virtual_size > spec.size_bytes:
        raise DiskTooSmall(
            f"image {base.image_id} has a virtual size of {base.virtual_size} bytes, larger than "
            f"the requested disk of {spec.size_bytes} bytes; ask for at least {base.virtual_size}"
        )


def disk_lock_name(spec: DiskSpec) -> str:
    """The lease under which a disk is created or deleted: its instance's (it covers disk.info)."""
    return diskinfo.instance_lease(spec.instance_id)


def check_recorded_format(path: Path, wanted: DiskFormat) -> None:
    """Refuse an existing disk whose recorded format is not `wanted`, or that has no record."""
    recorded = diskinfo.read_format(path.parent, path.name)
    if recorded != wanted:
        what = f"a {recorded} disk" if recorded else "a disk without a format record"
        raise DiskConflict(
            f"{path} already exists as {what}; the request wants a {wanted} disk. "
            "Delete the disk first to recreate it"
        )


def planned_disk(
    base: CachedImage, spec: DiskSpec, *, instances_dir: Path, host: str, fmt: DiskFormat
) -> tuple[Path, InstanceDisk]:
    """Where the disk of `spec` goes (its instance directory created) and what it will be;
    refuses a disk smaller than its base."""
    verify_base_size(base, spec)
    path = instance_dir(instances_dir, spec.instance_id, create=True) / spec.disk_name
    overlay = fmt == "qcow2"
    return path, InstanceDisk(
        host=host,
        instance_id=spec.instance_id,
        disk_name=spec.disk_name,
        path=str(path),
        format=fmt,
        virtual_size=spec.size_bytes,
        backing_file=base.path if overlay else None,
        backing_format=base.format if overlay else None,
    )


def overlay_uses_base(path: Path, base: CachedImage, runner: Runner, limits: Limits) -> bool:
    """Whether the disk at `path` is a qcow2 overlay (by its format record) on `base`."""
    if not path.is_file() or diskinfo.read_format(path.parent, path.name) != "qcow2":
        return False
    return qemu_img.info(runner, path, "qcow2", limits).backing_filename == base.path


def create_overlay(
    base: CachedImage,
    spec: DiskSpec,
    *,
    instances_dir: Path,
    host: str,
    runner: Runner,
    locks: LockFactory,
    limits: Limits,
    preallocate_space: bool = False,
) -> InstanceDisk:
    """Make sure the qcow2 overlay of `spec` on `base` exists and return it."""
    path, wanted = planned_disk(base, spec, instances_dir=instances_dir, host=host, fmt="qcow2")

    def find() -> InstanceDisk | None:
        if not path.exists():
            return None
        check_recorded_format(path, "qcow2")
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
        reserved = preallocate_space and preallocate(part, spec.size_bytes, runner)
        diskinfo.record_format(path.parent, path.name, "qcow2", lease)
        log.info("overlay_created", path=str(path), size=spec.size_bytes, preallocated=reserved)
        return Staged(file=part, result=wanted)

    lease = locks(disk_lock_name(spec))
    return publish_once(path, find=find, lease=lease, stage=stage)
