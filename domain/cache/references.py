"""Who uses a cached base: the references the cache manager checks before removing one.

A base is in use while any instance disk on any host has it as backing file (Nova's image cache
manager asks every instance on the host; here every host records its disks in one place). Each
reference is added under the entry's lock `cache:<key>`, the lock the cache manager deletes
under, after checking the entry is still there, so an entry is either referenced or already gone:

* the fetch step (or, on a cache hit, the entry task) pins the base for its canvas
  (`pending/<root task id>`) as soon as it has it,
  so nothing removes it before the disk is created on whichever host;
* the disk step adds the disk (`<host>/<instance>/<disk>`) before creating it and drops the pin;
  when it fails, it drops the disk's reference again unless the disk is there and uses this
  base (a conflicting request for an existing disk on another base leaves no reference);
* deleting the disk drops its reference.

References left by a canvas that died half-way are dropped by the cache manager once stale.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from domain.cache.directory import ImageCache, find_cached
from domain.cache.ports import References
from domain.core.errors import BaseImageMissing, TransientError
from domain.core.models import CachedImage, ImageSource
from domain.core.ports import LockFactory

log = structlog.get_logger(__name__)

PENDING = "pending/"
FETCH_ATTEMPTS = 3


def disk_holder(host: str, instance_id: str, disk_name: str) -> str:
    return f"{host}/{instance_id}/{disk_name}"


def pending_holder(root_id: str) -> str:
    """The pin a canvas holds on its base between fetching it and creating its disk."""
    return PENDING + root_id


def parse_disk_holder(holder: str) -> tuple[str, str, str] | None:
    """(host, instance id, disk name) of a disk holder; None for a pin."""
    parts = holder.split("/")
    if holder.startswith(PENDING) or len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


def entry_present(base: CachedImage) -> bool:
    """Whether the entry is complete in the cache (its record describes its file)."""
    path = Path(base.path)
    return ImageCache(path.parent).lookup(path.name) is not None


def touch(path: Path) -> None:
    """Mark a cache entry used now (its mtime is its last use, as Nova's cache manager reads)."""
    try:
        os.utime(path)
    except OSError as error:
        log.warning("cache_entry_touch_failed", path=str(path), error=error.strerror)


def claim(base: CachedImage, holder: str, *, locks: LockFactory, references: References) -> bool:
    """Reference `base` for `holder` unless it was removed; False when it is gone.

    The common case is one Redis round trip: the reference is added atomically unless the
    cache manager has marked the entry as being removed (it marks it, under `cache:<key>`, only
    when nothing holds it). Then the entry must still be on disk: a reference added after a
    removal finished is taken back. While an entry is marked, the claim waits for the cache
    manager's decision on that same lock.
    """
    if references.add_unless_evicting(base.key, holder):
        if entry_present(base):
            touch(Path(base.path))
            return True
        references.discard(base.key, holder)
        return False
    with locks(f"cache:{base.key}"):
        if not entry_present(base):
            return False
        references.add(base.key, holder)
        touch(Path(base.path))
        return True


def fetch_pinned(
    fetch: Callable[[], CachedImage],
    holder: str,
    *,
    locks: LockFactory,
    references: References,
) -> CachedImage:
    """Fetch a base and pin it for `holder`; fetch again if it was removed in between."""
    for _ in range(FETCH_ATTEMPTS):
        base = fetch()
        if claim(base, holder, locks=locks, references=references):
            return base
        log.warning("cache_entry_removed_before_pinned", key=base.key)
    raise BaseImageMissing(
        f"image cache entry was removed {FETCH_ATTEMPTS} times right after it was fetched; "
        "is the cache size cap smaller than the images in use?"
    )


def pin_if_cached(
    source: ImageSource,
    pin: str,
    *,
    cache: ImageCache,
    locks: LockFactory,
    references: References,
) -> CachedImage | None:
    """The image's cache entry, pinned for the canvas (`pin`), when it is already cached.

    An entry task asks this before it builds its canvas: a cache hit needs no fetch step (its
    postcondition holds), which spares every cache-hit prepare a whole task. None when the
    image must be fetched, or its entry went between the look and the pin.
    """
    cached = find_cached(source, cache)
    if cached is None or not claim(cached, pin, locks=locks, references=references):
        return None
    return cached


def unpin(cached: CachedImage, pin: str, references: References) -> None:
    """Drop the pin `pin_if_cached` took, when no canvas will (its entry task failed)."""
    references.discard(cached.key, pin)


@contextlib.contextmanager
def base_in_use(
    key: str,
    find_base: Callable[[], CachedImage],
    *,
    holder: str | None,
    uses_base: Callable[[CachedImage], bool],
    pin: str | None,
    locks: LockFactory,
    references: References,
    final_attempt: bool = True,
) -> Iterator[CachedImage]:
    """Find the base of cache entry `key` and reference it for the disk `holder` created
    inside the block (with no holder, the canvas's pin keeps it while the block runs); then
    drop the pin.

    A step that fails releases what it claimed: the disk's reference goes unless the disk is
    there and uses this base (`uses_base`: a conflicting request for an existing disk on another
    base must not pin this one); the pin goes unless the step will be retried (it keeps the
    base for the retry)."""
    claimed = holder or pin
    if claimed is None:
        raise ValueError("base_in_use needs a holder or a pin")
    referenced: CachedImage | None = None
    try:
        base = find_base()
        if not claim(base, claimed, locks=locks, references=references):
            raise BaseImageMissing(
                f"base image {base.image_id} ({key}) is no longer in the cache; "
                "send the request again to fetch it"
            )
        referenced = base
        yield base
    except BaseException as error:
        if holder is not None and referenced is not None and not _still_used(uses_base, referenced):
            references.discard(key, holder)
        if pin is not None and (final_attempt or not isinstance(error, TransientError)):
            references.discard(key, pin)
        raise
    if pin is not None:
        references.discard(key, pin)


def _still_used(uses_base: Callable[[CachedImage], bool], base: CachedImage) -> bool:
    """Whether the disk uses the base; when that cannot be told, it does (keeping a reference
    only delays an eviction; the cache manager drops it once stale)."""
    try:
        return uses_base(base)
    except Exception as error:
        log.warning("disk_base_unknown", key=base.key, error=str(error))
        return True
