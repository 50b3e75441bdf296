"""Snapshots of rbd disks, the two ways Nova takes them (the request's `method`):

* `direct` (Nova's `Rbd.direct_snapshot`): an RBD snapshot of the disk, cloned into the images
  pool, flattened (so it no longer needs the disk), the disk's snapshot removed, and a protected
  snapshot `snap` made on the copy: a new image, ready to be cloned, named by the new image's id
  like every imported image (so a prepare of that image id on the rbd backend clones it without
  a download). Built under a temporary name and renamed last, under the image's lease, like an
  import (domain.rbd.images); the result names its `rbd://` location, which Glance stores.
* `extract` (Nova's `snapshot_extract` for rbd): `qemu-img convert` from `rbd:` to a file under
  the snapshots directory, published like every file (domain.core.publish).

The guest must be stopped (as for file disks): imgprep does not freeze a running guest.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import structlog

from domain.core.errors import DiskConflict, DiskNotFound, InvalidRequest
from domain.core.paths import path_under
from domain.core.ports import Lease, LockFactory, Progress, no_progress
from domain.core.publish import lost_or
from domain.core.runner import Limits
from domain.formats import qemu_img
from domain.formats.conversion import CacheMode, publish_conversion
from domain.formats.snapshot_models import ConvertedImage, ConvertJob, RbdSnapshot, SnapshotRequest
from domain.rbd import names, tool
from domain.rbd.images import RbdContext, abandon, publish_image, read_record, remove_temporaries

log = structlog.get_logger(__name__)


def disk_of(request: SnapshotRequest, ctx: RbdContext) -> tuple[str, str]:
    """(pool, image) of the request's disk; DiskNotFound when it is not in the cluster."""
    pool = ctx.tool.access.pool
    image = names.disk_image(request.instance_id, request.disk_name)
    if tool.info(ctx.tool, pool, image) is None:
        raise DiskNotFound(f"the rbd disk {pool}/{image} does not exist")
    return pool, image


def direct_snapshot(request: SnapshotRequest, ctx: RbdContext) -> RbdSnapshot:
    """The disk as a new image in the images pool (method direct)."""
    if request.image_id is None:
        raise InvalidRequest("a direct snapshot needs the new image's image_id")
    structlog.contextvars.bind_contextvars(instance_id=request.instance_id)
    disk_pool, disk = disk_of(request, ctx)
    pool, name = ctx.tool.access.images_pool, names.image_name(request.image_id)
    source = names.disk_path(disk_pool, disk)
    lease = ctx.lease(pool, name)
    with lease:
        remove_temporaries(ctx, pool, name)
        found = _existing(ctx, pool, name, request.image_id, source)
        if found is not None:
            return found
        part = names.temporary(name, lease.fence)
        ctx.temporaries.add(ctx.resource(pool, name), part)
        try:
            made = _copy(ctx, request.image_id, (disk_pool, disk), part=part, lease=lease)
        except Exception as error:
            abandon(ctx, pool, name, part)  # first: the disk's snapshot has it as a clone
            try:
                _remove_disk_snapshot(ctx, disk_pool, disk, _disk_snapshot(name))
            except Exception as cleanup:
                log.warning("rbd_cleanup_failed", image=f"{disk_pool}/{disk}", error=str(cleanup))
            raise lost_or(error, lease) from error
        ctx.temporaries.discard(ctx.resource(pool, name), part)
        return made


def _disk_snapshot(name: str) -> str:
    """The snapshot of the disk a direct snapshot to `name` takes (removed once copied)."""
    return f"imgprep-{name[:16]}"


def _copy(
    ctx: RbdContext, image_id: str, disk: tuple[str, str], *, part: str, lease: Lease
) -> RbdSnapshot:
    pool, name = ctx.tool.access.images_pool, names.image_name(image_id)
    snapshot = _disk_snapshot(name)
    _remove_disk_snapshot(ctx, *disk, snapshot)  # a dead holder's, of the disk as it was then
    tool.snap_create(ctx.tool, *disk, snapshot)
    tool.snap_protect(ctx.tool, *disk, snapshot)
    tool.clone(ctx.tool, (*disk, snapshot), pool, part)
    tool.flatten(ctx.tool, pool, part)
    _remove_disk_snapshot(ctx, *disk, snapshot)  # flattened: the copy no longer needs it
    source = names.disk_path(*disk)
    record = {
        "image_id": image_id,
        "source": source,
        "source_sha256": "",
        "fence": lease.fence,
        "imported_at": datetime.now(UTC).isoformat(),
    }
    publish_image(ctx, pool, part, name, record=record, lease=lease, doing="making")
    found = _existing(ctx, pool, name, image_id, source)
    assert found is not None
    ctx.imported.remember(
        ctx.resource(pool, name),
        json.dumps({**record, "virtual_size": found.virtual_size}, sort_keys=True),
    )
    log.info("rbd_snapshot_created", image=f"{pool}/{name}", source=source)
    return found


def _existing(
    ctx: RbdContext, pool: str, name: str, image_id: str, source: str
) -> RbdSnapshot | None:
    """The direct snapshot already made for `image_id` from this disk; DiskConflict when the
    name holds another image."""
    snapshots = tool.snapshots(ctx.tool, pool, name)
    if snapshots is None:
        return None
    snap = next((s for s in snapshots if s.name == names.SNAPSHOT and s.protected), None)
    record = read_record(ctx.tool, pool, name)
    if snap is None or record.get("image_id") != image_id or record.get("source") != source:
        raise DiskConflict(
            f"{pool}/{name} (image {image_id}) already exists and is not a snapshot of {source}; "
            "choose another image_id"
        )
    return RbdSnapshot(
        location=names.location(ctx.tool.fsid(), pool, name),
        image_id=image_id,
        pool=pool,
        image=name,
        snapshot=names.SNAPSHOT,
        virtual_size=snap.size,
        source=source,
    )


def _remove_disk_snapshot(ctx: RbdContext, pool: str, disk: str, snapshot: str) -> None:
    snapshots = tool.snapshots(ctx.tool, pool, disk) or []
    found = next((s for s in snapshots if s.name == snapshot), None)
    if found is None:
        return
    if found.protected:
        tool.snap_unprotect(ctx.tool, pool, disk, snapshot)
    tool.snap_remove(ctx.tool, pool, disk, snapshot)


def extract(
    request: SnapshotRequest,
    ctx: RbdContext,
    *,
    snapshots_dir: Path,
    locks: LockFactory,
    limits: Limits,
    progress: Progress = no_progress,
) -> ConvertedImage:
    """The disk converted to a file under the snapshots directory (method extract)."""
    if request.target is None:
        raise InvalidRequest("a snapshot extracted to a file needs a target")
    structlog.contextvars.bind_contextvars(instance_id=request.instance_id)
    disk_pool, disk = disk_of(request, ctx)
    size = _size(ctx, disk_pool, disk)
    target = path_under(snapshots_dir, request.target, create_parents=True)
    job = ConvertJob(
        source=names.disk_path(disk_pool, disk),
        source_format="raw",
        target=str(target),
        target_format=request.format,
        compress=request.compress,
    )

    def write(part: Path, mode: CacheMode) -> None:
        qemu_img.convert(
            ctx.tool.ceph_runner,
            ctx.tool.access.qemu_filename(disk_pool, disk),
            part,
            source_format="raw",
            target_format=request.format,
            cache_mode=mode,
            compress=request.compress,
            needed=size,
            on_progress=lambda percent: progress(int(size * percent / 100), size),
        )

    return publish_conversion(
        job,
        write,
        runner=ctx.tool.runner,
        locks=locks,
        limits=limits,
        event="rbd_disk_extracted",
        what="extract",
    )


def _size(ctx: RbdContext, pool: str, image: str) -> int:
    found = tool.info(ctx.tool, pool, image)
    if found is None:
        raise DiskNotFound(f"the rbd disk {pool}/{image} does not exist")
    return found.size


def snapshot_rbd(
    request: SnapshotRequest,
    ctx: RbdContext,
    *,
    snapshots_dir: Path,
    locks: LockFactory,
    limits: Limits,
    progress: Progress = no_progress,
) -> RbdSnapshot | ConvertedImage:
    """The snapshot step of the rbd backend: direct or extract, as the request chooses."""
    if request.method == "direct":
        return direct_snapshot(request, ctx)
    return extract(
        request, ctx, snapshots_dir=snapshots_dir, locks=locks, limits=limits, progress=progress
    )
