"""Aging of the images imported into a Ceph cluster (Nova's image cache manager, for RBD): an
image imgprep imported (or made by a direct snapshot) is removed when nothing is cloned from
it and it has been unused for the window, never one with children.

"Unused since" is the last time a prepare asked for it or one of its clones was removed
(ImportedImages, in Redis's clock), else its import time. Each removal happens under the image's
lease, which is not waited for (an import in progress is skipped), and checks the children
again: `rbd snap unprotect` itself refuses a snapshot that has clones, so a clone made after
the check stops the removal instead of losing its parent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import structlog

from domain.core.errors import ImgprepError, LockBusy
from domain.core.models import CacheEviction, CacheEvictionReport
from domain.rbd import names, tool
from domain.rbd.images import RbdContext, read_record, remove_image

log = structlog.get_logger(__name__)


def age_rbd_images(
    ctx: RbdContext,
    *,
    minimum_age_seconds: float,
    host: str,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
) -> CacheEvictionReport:
    """One pass over the images pool; what was removed (or would be, in a dry run)."""
    pool = ctx.tool.access.images_pool
    evicted: list[CacheEviction] = []
    kept: list[str] = []
    busy: list[str] = []
    for name in tool.list_images(ctx.tool, pool):
        if names.is_temporary(name):
            continue  # a holder's, removed by the next holder of its lease
        record = read_record(ctx.tool, pool, name)
        if not record.get("image_id"):
            continue  # not an image imgprep made: never touched
        if tool.children(ctx.tool, pool, name, names.SNAPSHOT):
            kept.append(name)
            continue
        last_used = _last_used(ctx, pool, name, record)
        if clock() - last_used < minimum_age_seconds:
            continue
        size = next(
            (
                s.size
                for s in tool.snapshots(ctx.tool, pool, name) or []
                if s.name == names.SNAPSHOT
            ),
            0,
        )
        eviction = CacheEviction(
            key=name,
            image_id=str(record["image_id"]),
            size_on_disk=size,
            last_used=last_used,
            reason="unused",
        )
        if dry_run or _remove(ctx, pool, name):
            evicted.append(eviction)
        else:
            busy.append(name)
    bytes_after = 0
    return CacheEvictionReport(
        host=host,
        dry_run=dry_run,
        evicted=evicted,
        kept_in_use=kept,
        skipped_busy=busy,
        bytes_before=sum(item.size_on_disk for item in evicted) + bytes_after,
        bytes_after=bytes_after,
    )


def _last_used(ctx: RbdContext, pool: str, name: str, record: dict[str, object]) -> float:
    used = ctx.imported.last_used(ctx.resource(pool, name))
    if used is not None:
        return used
    try:
        return datetime.fromisoformat(str(record.get("imported_at"))).timestamp()
    except ValueError:
        return time.time()  # unknown: counted as used now, never removed on a guess


def _remove(ctx: RbdContext, pool: str, name: str) -> bool:
    """Remove the image under its lease unless it gained a clone; whether it was removed."""
    try:
        with ctx.lease(pool, name):
            if tool.children(ctx.tool, pool, name, names.SNAPSHOT):
                return False
            remove_image(ctx.tool, pool, name)
    except LockBusy:
        return False
    except ImgprepError as error:  # a clone made meanwhile: unprotect or removal refused
        log.warning("rbd_image_kept", image=f"{pool}/{name}", reason=str(error))
        return False
    ctx.imported.forget(ctx.resource(pool, name))
    log.info("rbd_image_aged_out", image=f"{pool}/{name}")
    return True
