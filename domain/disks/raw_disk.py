"""Instance disks as raw files (Nova's `images_type = raw`, `Raw.create_image`).

The cached base is copied to `<instances_dir>/<instance_id>/<disk_name>` keeping its holes
(`cp --sparse=always`, or `qemu-img convert` when the base is not raw), then grown to the
requested size with `qemu-img resize -f raw` (the format is pinned: a guest-written header must
never steer it), and optionally preallocated. Same lease, same publish shape and same format
record as the qcow2 overlay; a raw disk has no backing file, so it outlives its cache entry.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from domain.core.errors import DiskConflict
from domain.core.models import CachedImage, DiskSpec, InstanceDisk
from domain.core.ports import LockFactory
from domain.core.publish import Staged, publish_once
from domain.core.runner import Limits, Runner
from domain.disks import diskinfo
from domain.disks.overlay import check_recorded_format, disk_lock_name, planned_disk
from domain.disks.preallocation import preallocate
from domain.disks.sparse import allocated_bytes, sparse_copy
from domain.formats import qemu_img
from domain.formats.conversion import cache_mode_for

log = structlog.get_logger(__name__)


def copy_raw_disk(
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
    """Make sure the raw disk of `spec`, a copy of `base` grown to its size, exists."""
    path, wanted = planned_disk(base, spec, instances_dir=instances_dir, host=host, fmt="raw")

    def find() -> InstanceDisk | None:
        if not path.exists():
            return None
        check_recorded_format(path, "raw")
        existing = qemu_img.info(runner, path, "raw", limits)
        if existing.virtual_size != spec.size_bytes:
            raise DiskConflict(
                f"{path} already exists with {existing.virtual_size} bytes; the request wants "
                f"{spec.size_bytes} bytes. Delete the disk first to recreate it"
            )
        return wanted

    def stage(part: Path) -> Staged[InstanceDisk]:
        source = Path(base.path)
        if base.format == "raw":
            sparse_copy(runner, source, part)
        else:
            qemu_img.convert(
                runner,
                source,
                part,
                source_format=base.format,
                target_format="raw",
                cache_mode=cache_mode_for(part.parent),
            )
        if spec.size_bytes > base.virtual_size:
            qemu_img.resize(runner, part, fmt="raw", size=spec.size_bytes)
        reserved = preallocate_space and preallocate(part, spec.size_bytes, runner)
        diskinfo.record_format(path.parent, path.name, "raw", lease)
        log.info(
            "raw_disk_created",
            path=str(path),
            size=spec.size_bytes,
            allocated=allocated_bytes(part),
            preallocated=reserved,
        )
        return Staged(file=part, result=wanted)

    lease = locks(disk_lock_name(spec))
    return publish_once(path, find=find, lease=lease, stage=stage)
