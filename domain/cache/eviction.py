"""The image cache manager (Nova's imagecache): remove cached bases that nothing uses.

A base is in use while it has a holder (domain.cache.references: an instance disk on any host, or a
canvas between fetch and disk creation) or while a disk of this host has it as backing file
(`qemu-img info` of the disks disk.info records as qcow2 overlays, a check that does not trust
Redis, nor any byte a guest wrote). Unused bases are removed once unused for
`minimum_age_seconds`; with a size cap, unused bases idle for at least `min_idle_seconds` are
removed least recently used first until the cache fits.

Each removal takes the entry's lock `cache:<key>` without waiting (a held lock means a fetch or
a reference is being made: the entry is busy, not unused), checks everything again under it, and
removes the record before the image, so a reader sees a complete entry or none. Each pass also
clears, under the same lock, what publishing can leave beside an entry: temporaries of holders
that died or lost their lease, and a record whose image never followed (domain.core.publish).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from domain.cache.directory import CACHE_TEMPORARIES, ImageCache
from domain.cache.inventory import (
    EntryState,
    UnverifiableDisk,
    leftover_keys,
    local_backing_files,
    read_entries,
    read_entry,
)
from domain.cache.ports import References
from domain.cache.references import PENDING, parse_disk_holder
from domain.core.errors import LockBusy
from domain.core.fileops import fsync_directory, remove_files
from domain.core.models import CacheEviction, CacheEvictionReport, EvictCacheRequest
from domain.core.ports import LockFactory
from domain.core.publish import record_path, stale_temporaries
from domain.core.runner import Limits, Runner

log = structlog.get_logger(__name__)

# How long an entry stays marked as being removed if the cache manager dies while removing it.
EVICTION_MARK_SECONDS = 60.0


@dataclass(frozen=True)
class AgingPolicy:
    """When an unused base goes (Nova's remove_unused_original_minimum_age_seconds)."""

    minimum_age_seconds: float = 86400.0
    max_bytes: int = 0  # 0: no size cap
    min_idle_seconds: float = 600.0
    stale_reference_seconds: float = 86400.0


def evict_cache(
    request: EvictCacheRequest, manager: CacheManager, configured: AgingPolicy
) -> CacheEvictionReport:
    """One pass of the cache manager under the configured policy, with what the request
    overrides (its unset fields keep the configured values)."""
    policy = configured
    if request.remove_unused_original_minimum_age_seconds is not None:
        policy = replace(
            policy, minimum_age_seconds=request.remove_unused_original_minimum_age_seconds
        )
    if request.max_bytes is not None:
        policy = replace(policy, max_bytes=request.max_bytes)
    return manager.run(policy, dry_run=request.dry_run)


@dataclass
class CacheManager:
    """One host's view of the shared cache; `run()` is one pass of the periodic job."""

    cache: ImageCache
    references: References
    locks: LockFactory  # locks that do not wait: a busy entry is skipped
    instances_dir: Path
    host: str
    runner: Runner
    limits: Limits
    clock: Callable[[], float] = time.time
    # told of every entry removed (host scope: its copy is withdrawn from the peer registry)
    removed: Callable[[str], None] = lambda key: None
    _in_use_here: dict[str, list[Path]] = field(default_factory=dict)

    def run(self, policy: AgingPolicy, *, dry_run: bool = False) -> CacheEvictionReport:
        now = self.clock()
        try:
            self._in_use_here = local_backing_files(self.instances_dir, self.runner, self.limits)
        except UnverifiableDisk as error:
            # Not knowing what a local disk uses means removing nothing this time.
            log.warning("cache_manager_cannot_verify", error=str(error))
            return self._report(read_entries(self.cache, self.references), [], [], [], dry_run)
        if not dry_run:
            self._clear_leftovers()
        dropped = [] if dry_run else self._drop_stale_references(policy, now)
        entries = read_entries(self.cache, self.references)
        chosen = choose_evictions(entries, policy, now=now, in_use=self._used_here)
        evicted, busy = [], []
        for entry, reason in chosen:
            if dry_run:
                evicted.append(eviction(entry, reason))
                continue
            try:
                if self._remove(entry.key, reason, policy):
                    evicted.append(eviction(entry, reason))
            except LockBusy:
                busy.append(entry.key)
        return self._report(entries, evicted, busy, dropped, dry_run)

    def _used_here(self, entry: EntryState) -> bool:
        return str(entry.path) in self._in_use_here or (
            os.path.realpath(entry.path) in self._in_use_here
        )

    def _remove(self, key: str, reason: str, policy: AgingPolicy) -> bool:
        """Remove the entry under its lock if, checked again, it is still to be removed."""
        with self.locks(f"cache:{key}"):
            entry = read_entry(self.cache, key, self.references)
            if entry is None:
                return False
            idle = self.clock() - entry.last_used
            minimum = (
                policy.min_idle_seconds
                if reason == "over_size_cap"
                else (policy.minimum_age_seconds)
            )
            if entry.holders or self._used_here(entry) or idle < minimum:
                log.info("cache_entry_kept_on_recheck", key=key, holders=len(entry.holders))
                return False
            # from here on a new reference fails (domain.cache.references.claim), or, if one came in
            # since the check above, the entry stays
            if not self.references.begin_eviction(key, EVICTION_MARK_SECONDS):
                log.info("cache_entry_kept_on_recheck", key=key, holders="new")
                return False
            try:
                remove_files([record_path(entry.path)])
                remove_files([entry.path, *stale_temporaries(entry.path, CACHE_TEMPORARIES)])
                fsync_directory(entry.path.parent)
            finally:
                self.references.end_eviction(key)
        self.removed(key)
        log.info(
            "cache_entry_removed",
            key=key,
            image_id=entry.image_id,
            reason=reason,
            bytes=entry.size_on_disk,
            idle_seconds=round(idle),
        )
        return True

    def _clear_leftovers(self) -> None:
        """Under each entry's lock (a busy one is skipped: its holder clears them itself),
        remove temporaries and a record whose image is missing. No holder can still complete
        them: whoever wrote them lost its lease when this pass got the lock."""
        for key in leftover_keys(self.cache):
            entry = self.cache.entry(key)
            try:
                with self.locks(f"cache:{key}"):
                    removed = remove_files(stale_temporaries(entry, CACHE_TEMPORARIES))
                    if not entry.exists():
                        removed += remove_files([record_path(entry)])
                    if removed:
                        fsync_directory(self.cache.root)
            except LockBusy:
                continue
            if removed:
                log.info("cache_leftovers_removed", key=key, files=[p.name for p in removed])

    def _drop_stale_references(self, policy: AgingPolicy, now: float) -> list[str]:
        """Pins of canvases that never finished, and this host's references to disks that are
        gone or no longer use the base, once older than `stale_reference_seconds`."""
        dropped = []
        for entry in read_entries(self.cache, self.references):
            for holder, since in entry.holders.items():
                if now - since < policy.stale_reference_seconds:
                    continue
                if holder.startswith(PENDING) or self._local_disk_gone(holder, entry):
                    self.references.discard(entry.key, holder)
                    dropped.append(f"{entry.key} {holder}")
                    log.info("stale_reference_dropped", key=entry.key, holder=holder)
        return dropped

    def _local_disk_gone(self, holder: str, entry: EntryState) -> bool:
        parsed = parse_disk_holder(holder)
        if parsed is None or parsed[0] != self.host:
            return False  # another host's disk: that host's cache manager checks it
        disk = self.instances_dir / parsed[1] / parsed[2]
        users = self._in_use_here.get(str(entry.path), []) + self._in_use_here.get(
            os.path.realpath(entry.path), []
        )
        return disk not in users

    def _report(
        self,
        entries: list[EntryState],
        evicted: list[CacheEviction],
        busy: list[str],
        dropped: list[str],
        dry_run: bool,
    ) -> CacheEvictionReport:
        before = sum(entry.size_on_disk for entry in entries)
        gone = {e.key for e in evicted}
        return CacheEvictionReport(
            host=self.host,
            dry_run=dry_run,
            evicted=evicted,
            kept_in_use=sorted(
                e.key for e in entries if e.key not in gone and (e.holders or self._used_here(e))
            ),
            skipped_busy=sorted(busy),
            dropped_references=dropped,
            bytes_before=before,
            bytes_after=before - sum(e.size_on_disk for e in evicted),
        )


def choose_evictions(
    entries: list[EntryState],
    policy: AgingPolicy,
    *,
    now: float,
    in_use: Callable[[EntryState], bool],
) -> list[tuple[EntryState, str]]:
    """Unused entries past the minimum age; then, over the size cap, the least recently used
    unused entries idle for at least min_idle_seconds until the cache fits."""
    unused = [e for e in entries if not e.holders and not in_use(e)]
    chosen = [
        (e, "unused" if e.record else "orphaned")
        for e in unused
        if now - e.last_used >= policy.minimum_age_seconds
    ]
    if policy.max_bytes:
        size = sum(e.size_on_disk for e in entries) - sum(e.size_on_disk for e, _ in chosen)
        already = {e.key for e, _ in chosen}
        for entry in sorted(unused, key=lambda e: e.last_used):
            if size <= policy.max_bytes:
                break
            if entry.key in already or now - entry.last_used < policy.min_idle_seconds:
                continue
            chosen.append((entry, "over_size_cap"))
            size -= entry.size_on_disk
    return chosen


def eviction(entry: EntryState, reason: str) -> CacheEviction:
    return CacheEviction.model_validate(
        {
            "key": entry.key,
            "image_id": entry.image_id,
            "size_on_disk": entry.size_on_disk,
            "last_used": entry.last_used,
            "reason": reason,
        }
    )
