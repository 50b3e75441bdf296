"""Instance disks on the rbd backend: clones of an imported image's protected snapshot (Nova's
`Rbd.create_image` and `clone`), and their removal (Nova's `_cleanup_rbd`).

A disk is `<pool>/<instance>_<disk>`, made under the cluster-wide lease of that name:

    take the lease → remove every holder's temporaries → clone into `<name>.part.<fence>` →
    grow it to the requested size → fence check → rename into `<name>`

so a clone killed half-way (an rbd clone is several steps in librbd) is never under the final
name. The rename is also the check for a disk already there: when the name is taken, the disk
there is compared with the request (same parent, same size: the answer; anything else:
DiskConflict) and the temporary goes. A disk smaller than its image is refused before anything
is made (DiskTooSmall), and rbd never shrinks an image anyway (no --allow-shrink).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from domain.core.errors import BaseImageMissing, DiskConflict, LockLost
from domain.core.models import (
    CachedImage,
    DeletedDisk,
    DeleteDiskRequest,
    InstanceDisk,
    PreparedDisk,
    PrepareRequest,
)
from domain.core.ports import Lease
from domain.core.publish import lost_or
from domain.disks.instance_disks import verify_base_size
from domain.rbd import names, tool
from domain.rbd.images import (
    RbdContext,
    abandon,
    import_to_rbd,
    remove_image,
    remove_temporaries,
)
from domain.rbd.tool import RbdExists, RbdNotFound

log = structlog.get_logger(__name__)


class ParentMissing(Exception):
    """The parent snapshot is not in the cluster (rbd clone answered ENOENT)."""


@dataclass(frozen=True)
class Parent:
    """The snapshot a disk is cloned from."""

    pool: str
    image: str
    snapshot: str
    location: str

    @property
    def spec(self) -> tuple[str, str, str]:
        return self.pool, self.image, self.snapshot


def parent_of(request: PrepareRequest, ctx: RbdContext) -> Parent:
    """The parent of the request's disk, derived from the request (never a path from the
    previous step's message): its rbd:// source, or its image imported into the images pool."""
    parsed = names.parse_location(request.image.url)
    if parsed is not None:
        _, pool, image, snapshot = parsed
    else:
        pool = ctx.tool.access.images_pool
        image, snapshot = names.image_name(request.image.image_id), names.SNAPSHOT
    return Parent(pool, image, snapshot, names.location(ctx.tool.fsid(), pool, image, snapshot))


def clone_rbd_disk(
    request: PrepareRequest, base: CachedImage, ctx: RbdContext, host: str
) -> PreparedDisk:
    """The disk step of the rbd backend: the request's disk as a clone of its image (`base`,
    from the import step, gives its virtual size for the size check only)."""
    spec = request.disk
    verify_base_size(base, spec)
    parent = parent_of(request, ctx)
    pool, name = ctx.tool.access.pool, names.disk_image(spec.instance_id, spec.disk_name)
    structlog.contextvars.bind_contextvars(instance_id=spec.instance_id)
    wanted = InstanceDisk(
        host=host,
        instance_id=spec.instance_id,
        disk_name=spec.disk_name,
        path=names.disk_path(pool, name),
        format="raw",
        virtual_size=spec.size_bytes,
        backing_file=parent.location,
        backing_format="raw",
        backend="rbd",
    )
    lease = ctx.lease(pool, name)
    with lease:
        remove_temporaries(ctx, pool, name)
        part = names.temporary(name, lease.fence)
        ctx.temporaries.add(ctx.resource(pool, name), part)
        try:
            try:
                disk = _clone(
                    ctx, parent, pool=pool, name=name, part=part, wanted=wanted, lease=lease
                )
            except ParentMissing:
                if names.parse_location(request.image.url) is not None:
                    raise BaseImageMissing(
                        f"the source {parent.location} is no longer in the cluster"
                    ) from None
                # its record outlived it (removed behind imgprep's back): import it again
                ctx.imported.forget(ctx.resource(parent.pool, parent.image))
                import_to_rbd(request.image, ctx)
                disk = _clone(
                    ctx, parent, pool=pool, name=name, part=part, wanted=wanted, lease=lease
                )
        except Exception as error:
            abandon(ctx, pool, name, part)
            raise lost_or(error, lease) from error
        ctx.temporaries.discard(ctx.resource(pool, name), part)
    base = base.model_copy(update={"path": parent.location, "key": parent.image})
    return PreparedDisk(disk=disk, base=base)


def _clone(
    ctx: RbdContext,
    parent: Parent,
    *,
    pool: str,
    name: str,
    part: str,
    wanted: InstanceDisk,
    lease: Lease,
) -> InstanceDisk:
    try:
        tool.clone(ctx.tool, parent.spec, pool, part)
    except RbdNotFound:
        raise ParentMissing(parent.location) from None
    tool.resize(ctx.tool, pool, part, wanted.virtual_size)
    lease.ensure_held()
    try:
        tool.rename(ctx.tool, pool, part, name)
    except RbdExists:
        existing = _existing(ctx, parent, pool, name, wanted)
        remove_image(ctx.tool, pool, part)
        return existing
    log.info(
        "rbd_disk_created", disk=f"{pool}/{name}", parent=parent.location, size=wanted.virtual_size
    )
    return wanted


def _existing(
    ctx: RbdContext, parent: Parent, pool: str, name: str, wanted: InstanceDisk
) -> InstanceDisk:
    """The disk already under the name, if it is the one the request wants."""
    found = tool.info(ctx.tool, pool, name)
    if found is None:  # removed meanwhile: only a holder of the lease removes disks
        raise LockLost(f"{pool}/{name} vanished while this worker held its lease")
    if found.parent_spec() == parent.spec and found.size == wanted.virtual_size:
        return wanted
    got = "/".join(found.parent_spec() or ("no parent",))
    raise DiskConflict(
        f"{pool}/{name} already exists as a clone of {got} with {found.size} bytes; the request "
        f"wants a clone of {'/'.join(parent.spec)} with {wanted.virtual_size} bytes. Delete the "
        "disk first to recreate it"
    )


def remove_rbd_disk(request: DeleteDiskRequest, ctx: RbdContext, host: str) -> DeletedDisk:
    """Remove the disk's clone with its snapshots (Nova's `_cleanup_rbd`: unprotect, remove
    each snapshot, remove the image); a disk that is not there is not an error. A snapshot that
    still has clones (a direct snapshot not yet flattened) or an image a guest holds open is
    RbdImageBusy, retried."""
    pool = ctx.tool.access.pool
    name = names.disk_image(request.instance_id, request.disk_name)
    structlog.contextvars.bind_contextvars(instance_id=request.instance_id)
    with ctx.lease(pool, name):
        remove_temporaries(ctx, pool, name)
        found = tool.info(ctx.tool, pool, name)
        parent = found.parent_spec() if found is not None else None
        existed = remove_image(ctx.tool, pool, name)
    if parent is not None:  # its parent is unused from now on, if this was its last clone
        ctx.imported.touch(ctx.resource(parent[0], parent[1]))
    log.info("rbd_disk_removed", disk=f"{pool}/{name}", existed=existed)
    return DeletedDisk(
        host=host,
        instance_id=request.instance_id,
        disk_name=request.disk_name,
        path=names.disk_path(pool, name),
        existed=existed,
    )
