"""Instance disks on a cached base: the one shape both backends share (domain.disks.backends).

The disk is created at `<instances_dir>/<instance_id>/<disk_name>` under the instance's lease
`disk:<instance_id>` (the one that also covers its disk.info), through the publish-once shape
(domain.core.publish): a disk that is already there as the request wants it is the answer, one
that is not is a conflict. A base larger than the requested size is refused (Nova's
FlavorDiskTooSmall). The disk's format is recorded in disk.info before it appears under its
name, and its full size is reserved when `preallocate` asks for it.

`create_instance_disk` is the disk step of both backends (imgprep.create_overlay and
imgprep.copy_raw_disk, through tasks.disk_steps): the base is the cache entry of the request's
image, found by its key in the cache directory (a path or format from the message is never
used), referenced for the disk while it is made (domain.cache.references.base_in_use),
and the canvas's pin on it dropped once the disk holds its reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from domain.cache.directory import ImageCache, cache_key, cached_base
from domain.cache.ports import References
from domain.cache.references import base_in_use, disk_holder
from domain.core import diskinfo
from domain.core.errors import DiskConflict, DiskTooSmall
from domain.core.models import (
    CachedImage,
    DiskFormat,
    DiskSpec,
    InstanceDisk,
    PreparedDisk,
    PrepareRequest,
)
from domain.core.paths import instance_dir
from domain.core.ports import LockFactory
from domain.core.publish import Staged, publish_once
from domain.core.runner import Limits, Runner
from domain.core.sparse import allocated_bytes
from domain.disks.backends import BACKENDS, DiskBackend, FileBackend
from domain.disks.preallocation import preallocate
from domain.formats import qemu_img

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DiskContext:
    """Where instance disks go on this host and the collaborators that make them."""

    cache: ImageCache
    instances_dir: Path
    host: str
    runner: Runner
    locks: LockFactory
    references: References
    limits: Limits
    preallocate: bool = False  # preallocate_images = "space"


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


def create_disk(
    backend: DiskBackend, base: CachedImage, spec: DiskSpec, ctx: DiskContext
) -> InstanceDisk:
    """Make sure the disk of `spec` on `base`, of the kind `backend` makes, exists; return it."""
    path, wanted = planned_disk(
        base, spec, instances_dir=ctx.instances_dir, host=ctx.host, fmt=backend.format
    )

    def find() -> InstanceDisk | None:
        if not path.exists():
            return None
        check_recorded_format(path, backend.format)
        mismatch = backend.mismatch(
            qemu_img.info(ctx.runner, path, backend.format, ctx.limits), base, spec
        )
        if mismatch is not None:
            raise DiskConflict(
                f"{path} already exists with {mismatch}. Delete the disk first to recreate it"
            )
        return wanted

    def stage(part: Path) -> Staged[InstanceDisk]:
        backend.build(part, base, spec, ctx.runner)
        reserved = ctx.preallocate and preallocate(part, spec.size_bytes, ctx.runner)
        diskinfo.record_format(path.parent, path.name, backend.format, lease)
        log.info(
            backend.created_event,
            path=str(path),
            size=spec.size_bytes,
            allocated=allocated_bytes(part),
            preallocated=reserved,
        )
        return Staged(file=part, result=wanted)

    lease = ctx.locks(disk_lock_name(spec))
    return publish_once(path, find=find, lease=lease, stage=stage)


def create_instance_disk(
    backend_name: FileBackend,
    request: PrepareRequest,
    claimed: CachedImage,
    ctx: DiskContext,
    *,
    pin: str,
    final_attempt: bool = True,
) -> PreparedDisk:
    """Create the request's disk on its cached base (`claimed`, from the previous step, names
    the entry's key only) and answer with the disk and its base.

    A disk that uses its base references it before it is made; a raw copy does not (the
    canvas's pin protects the base while it is copied, and goes with the copy). On a failure
    that will be retried the pin stays, for the retry (`final_attempt`).

    The step chooses the backend (`backend_name`: imgprep.create_overlay qcow2,
    imgprep.copy_raw_disk raw), not the request: a request is never taken for another backend."""
    backend = BACKENDS[backend_name]
    spec = request.disk
    key = cache_key(request.image.image_id)
    structlog.contextvars.bind_contextvars(image_key=key)
    path = Path(ctx.instances_dir, spec.instance_id, spec.disk_name)

    def uses_base(base: CachedImage) -> bool:
        return backend.uses_base(path, base, ctx.runner, ctx.limits)

    holder = disk_holder(ctx.host, spec.instance_id, spec.disk_name)
    with base_in_use(
        key,
        lambda: cached_base(request.image, claimed, ctx.cache),
        holder=holder if backend.references_base else None,
        uses_base=uses_base,
        pin=pin,
        locks=ctx.locks,
        references=ctx.references,
        final_attempt=final_attempt,
    ) as base:
        disk = create_disk(backend, base, spec, ctx)
    return PreparedDisk(disk=disk, base=base)
