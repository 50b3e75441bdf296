"""The cache manager's decisions, fast: which entries go, and which stale references are
dropped. Real files in a temporary cache, references and locks in memory
(tests.fakes); no qemu-img is needed since
no instance disk exists here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from domain.cache.directory import ImageCache
from domain.cache.eviction import AgingPolicy, CacheManager, choose_evictions
from domain.cache.inventory import EntryState, read_entries
from domain.cache.references import disk_holder, pending_holder
from domain.core.models import CachedImage
from domain.core.runner import Limits, Runner
from tests.fakes.locks import InMemoryLocks
from tests.fakes.references import InMemoryReferences

NOW = 1_000_000_000.0
HOUR = 3600.0


def entry(key: str, *, idle: float, size: int = 100, holders: int = 0) -> EntryState:
    return EntryState(
        key=key,
        path=Path("/cache") / key,
        record=None,
        size_on_disk=size,
        last_used=NOW - idle,
        holders={f"h{i}": NOW for i in range(holders)},
    )


def never_local(_: EntryState) -> bool:
    return False


def test_unused_entries_past_the_minimum_age_go_and_used_ones_never() -> None:
    entries = [
        entry("old", idle=48 * HOUR),
        entry("young", idle=HOUR),
        entry("used", idle=99 * HOUR, holders=1),
    ]
    chosen = choose_evictions(
        entries, AgingPolicy(minimum_age_seconds=24 * HOUR), now=NOW, in_use=never_local
    )
    assert [(e.key, reason) for e, reason in chosen] == [("old", "orphaned")]


def test_local_disk_keeps_an_entry_without_references() -> None:
    entries = [entry("backing", idle=48 * HOUR)]
    chosen = choose_evictions(
        entries, AgingPolicy(minimum_age_seconds=0), now=NOW, in_use=lambda e: True
    )
    assert chosen == []


def test_size_cap_takes_least_recently_used_unused_entries_idle_long_enough() -> None:
    entries = [
        entry("a", idle=5 * HOUR, size=100, holders=1),  # in use: never
        entry("b", idle=3 * HOUR, size=100),
        entry("c", idle=2 * HOUR, size=100),
        entry("d", idle=60, size=100),  # used a minute ago: below min_idle
    ]
    policy = AgingPolicy(minimum_age_seconds=24 * HOUR, max_bytes=150, min_idle_seconds=600)
    chosen = choose_evictions(entries, policy, now=NOW, in_use=never_local)
    # b then c go; the cache is still over the cap, but a is in use and d too recent
    assert [(e.key, reason) for e, reason in chosen] == [
        ("b", "over_size_cap"),
        ("c", "over_size_cap"),
    ]


def test_no_cap_means_no_size_evictions() -> None:
    entries = [entry("b", idle=3 * HOUR, size=10**12)]
    assert choose_evictions(entries, AgingPolicy(), now=NOW, in_use=never_local) == []


@pytest.fixture
def manager(tmp_path: Path) -> CacheManager:
    (tmp_path / "cache").mkdir()
    (tmp_path / "instances").mkdir()
    return CacheManager(
        cache=ImageCache(tmp_path / "cache"),
        references=InMemoryReferences(clock=lambda: NOW),
        locks=InMemoryLocks(wait=0),
        instances_dir=tmp_path / "instances",
        host="here",
        runner=Runner(default_timeout=30),
        limits=Limits(cpu_seconds=10, address_space_bytes=2**30),
        clock=lambda: NOW,
    )


def cached(manager: CacheManager, key: str, *, idle: float) -> CachedImage:
    path = manager.cache.entry(key)
    path.write_bytes(b"x" * 4096)
    image = CachedImage(
        key=key,
        image_id=f"id-{key}",
        path=str(path),
        format="raw",
        virtual_size=4096,
        source_sha256="0" * 64,
    )
    from datetime import UTC, datetime

    from domain.cache.directory import CacheRecord

    record = CacheRecord(
        image=image,
        source="http://x/y",
        source_format="raw",
        source_bytes=4096,
        fence=1,
        fetched_at=datetime.now(UTC),
    )
    path.with_name(key + ".json").write_text(record.model_dump_json())
    os.utime(path, (NOW - idle, NOW - idle))
    return image


def test_stale_pins_and_references_of_gone_local_disks_are_dropped(manager: CacheManager) -> None:
    # Given an entry held by a stale pin, a stale reference of a local disk that is gone, a fresh
    # pin, and another host's stale reference
    cached(manager, "k1", idle=48 * HOUR)
    refs = manager.references
    assert isinstance(refs, InMemoryReferences)
    refs.clock = lambda: NOW - 48 * HOUR
    for holder in (
        pending_holder("old-canvas"),
        disk_holder("here", "vm-gone", "disk"),
        disk_holder("there", "vm-remote", "disk"),
    ):
        refs.add("k1", holder)
    refs.clock = lambda: NOW - 60
    refs.add("k1", pending_holder("running-canvas"))

    # When the cache manager runs
    report = manager.run(AgingPolicy(minimum_age_seconds=0, stale_reference_seconds=HOUR))

    # Then the stale pin and the gone local disk's reference were dropped; the entry stays,
    # held by the running canvas and by the other host (whose disks this host cannot see)
    assert sorted(report.dropped_references) == sorted(
        [f"k1 {pending_holder('old-canvas')}", f"k1 {disk_holder('here', 'vm-gone', 'disk')}"]
    )
    assert sorted(refs.holders("k1")) == sorted(
        [pending_holder("running-canvas"), disk_holder("there", "vm-remote", "disk")]
    )
    assert report.kept_in_use == ["k1"] and report.evicted == []
    assert manager.cache.entry("k1").is_file()


def test_a_busy_entry_is_skipped_and_an_unused_one_removed_record_first(
    manager: CacheManager,
) -> None:
    # Given two aged unused entries, one of them locked (being fetched again)
    cached(manager, "busy", idle=48 * HOUR)
    cached(manager, "idle", idle=48 * HOUR)
    with manager.locks("cache:busy"):
        report = manager.run(AgingPolicy(minimum_age_seconds=HOUR))
    # Then the locked one is reported busy and kept; the other is gone with its record
    assert report.skipped_busy == ["busy"]
    assert [e.key for e in report.evicted] == ["idle"]
    assert not manager.cache.entry("idle").exists()
    assert not manager.cache.entry("idle").with_name("idle.json").exists()
    assert [e.key for e in read_entries(manager.cache, manager.references)] == ["busy"]


def test_dry_run_removes_nothing(manager: CacheManager) -> None:
    cached(manager, "old", idle=48 * HOUR)
    report = manager.run(AgingPolicy(minimum_age_seconds=HOUR), dry_run=True)
    assert [e.key for e in report.evicted] == ["old"] and report.dry_run
    assert manager.cache.entry("old").is_file()


def test_leftovers_of_publishing_are_cleared_under_the_lock_and_busy_ones_left(
    manager: CacheManager,
) -> None:
    # Given an entry with a temporary left beside it (a holder killed after its renames), a
    # record whose image never followed, temporaries of a dead holder with no entry, and the
    # temporary of a holder that is publishing right now (its lock is held)
    cached(manager, "whole", idle=HOUR)
    root = manager.cache.root
    leftovers = ["whole.part.3", "dangling.json", "dead.part.4", "dead.converted.4", "dead.part"]
    for name in leftovers:
        (root / name).write_bytes(b"left")
    (root / "busy.part.9").write_bytes(b"being written")
    with manager.locks("cache:busy"):
        # When the cache manager runs (nothing is old enough to be evicted)
        report = manager.run(AgingPolicy(minimum_age_seconds=2 * HOUR))
    # Then only the whole entry and the busy holder's temporary are left
    assert report.evicted == []
    assert sorted(p.name for p in root.iterdir()) == ["busy.part.9", "whole", "whole.json"]
    assert manager.cache.lookup("whole") is not None
