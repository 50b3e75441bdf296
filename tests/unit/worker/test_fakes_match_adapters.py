"""The ports' fakes (tests/fakes) behave as the Redis adapters they stand for (worker/redis_*),
so a domain test on a fake says something about the real thing: each scenario runs on both."""

from __future__ import annotations

from collections.abc import Callable

import fakeredis
import pytest

from domain.cache.peers import ImageDigests, PeerCopy
from domain.cache.ports import PeerRegistry, References
from domain.core.errors import DiskBusy, LockBusy, LockLost
from domain.core.journal import PlannedStep, StepJournal
from domain.core.ports import LockFactory
from domain.disks.device_records import WorkDir
from domain.disks.ports import DeviceLedger
from domain.rbd.ports import ImportedImages, Temporaries
from tests.fakes.device_ledger import InMemoryDeviceLedger
from tests.fakes.journal import InMemoryJournal
from tests.fakes.locks import InMemoryLocks
from tests.fakes.peers import InMemoryPeerRegistry
from tests.fakes.references import InMemoryReferences
from tests.fakes.temporaries import InMemoryImportedImages, InMemoryTemporaries
from worker.stores.redis_journal import RedisJournal
from worker.stores.redis_ledger import RedisDeviceLedger
from worker.stores.redis_locks import LOCK_PREFIX, RedisLockFactory
from worker.stores.redis_peers import RedisPeerRegistry
from worker.stores.redis_rbd import RedisImportedImages, RedisTemporaries
from worker.stores.redis_references import RedisReferences


def fake_redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


REFERENCES: dict[str, Callable[[], References]] = {
    "fake": InMemoryReferences,
    "redis": lambda: RedisReferences(fake_redis()),
}
LEDGERS: dict[str, Callable[[], DeviceLedger]] = {
    "fake": InMemoryDeviceLedger,
    "redis": lambda: RedisDeviceLedger(fake_redis(), "host-1"),
}
JOURNALS: dict[str, Callable[[], StepJournal]] = {
    "fake": InMemoryJournal,
    "redis": lambda: RedisJournal(fake_redis(), 3600),
}


@pytest.mark.parametrize("make", REFERENCES.values(), ids=REFERENCES.keys())
def test_references(make: Callable[[], References]) -> None:
    refs = make()
    refs.add("k", "pending/a")
    refs.add("k", "h/vm/disk")
    assert sorted(refs.holders("k")) == ["h/vm/disk", "pending/a"]
    assert not refs.begin_eviction("k", 60)  # held: not removable
    refs.discard("k", "pending/a")
    assert refs.forget("h/vm/disk") == ["k"]
    assert refs.holders("k") == {}
    assert refs.begin_eviction("k", 60)
    assert not refs.add_unless_evicting("k", "pending/b")  # being removed: no new holder
    refs.end_eviction("k")
    assert refs.add_unless_evicting("k", "pending/b")
    assert list(refs.holders("k")) == ["pending/b"]


@pytest.mark.parametrize("make", LEDGERS.values(), ids=LEDGERS.keys())
def test_device_ledger(make: Callable[[], DeviceLedger]) -> None:
    ledger = make()
    record = ledger.claim("vm/disk", "op-a", "w1")
    assert ledger.claim("vm/disk", "op-a", "w2").worker == "w2"
    with pytest.raises(DiskBusy):
        ledger.claim("vm/disk", "op-b", "w1")
    ledger.put(record.with_resource(WorkDir(path="/s/vm/disk")))
    stored = ledger.get("vm/disk")
    assert stored is not None and [r.kind for r in stored.resources] == ["workdir"]
    ledger.drop("vm/disk", "op-b")  # not its owner: nothing happens
    assert [r.disk for r in ledger.records()] == ["vm/disk"]
    ledger.drop("vm/disk", "op-a")
    assert ledger.get("vm/disk") is None and ledger.records() == []


@pytest.mark.parametrize("make", JOURNALS.values(), ids=JOURNALS.keys())
def test_step_journal(make: Callable[[], StepJournal]) -> None:
    journal = make()
    assert journal.read("root") is None
    fetch = PlannedStep(name="imgprep.fetch_to_cache", task_id="root:fetch_to_cache")
    disk = PlannedStep(name="imgprep.create_overlay", task_id="t2", queue="imgprep.host.h")
    journal.plan("root", [fetch, disk], done=[fetch], worker="w1")
    journal.started("root", "t2", disk.name, "w1")
    journal.finished("root", "t2", disk.name, "RETRY", "LockBusy: busy")
    journal.started("root", "t2", disk.name, "w2")
    journal.finished("root", "t2", disk.name, "SUCCESS")
    view = journal.read("root")
    assert view is not None and view.plan == [fetch, disk]
    done, made = view.records["root:fetch_to_cache"], view.records["t2"]
    assert (done.state, done.attempts, done.finishes) == ("SUCCESS", 1, 1)
    assert (made.state, made.attempts, made.finishes, made.worker) == ("SUCCESS", 2, 1, "w2")
    assert made.seconds is not None and made.error is None


def fake_locks(wait: float) -> tuple[LockFactory, Callable[[str], None]]:
    locks = InMemoryLocks(wait=wait)
    return locks, locks.take_over


def redis_locks(wait: float) -> tuple[LockFactory, Callable[[str], None]]:
    client = fake_redis()

    def take_over(name: str) -> None:  # another holder's lease: the key now holds its token
        client.set(LOCK_PREFIX + name, b"someone-else")

    return RedisLockFactory(client, lease=5, renew_every=1, wait=wait), take_over


LOCKS: dict[str, Callable[[float], tuple[LockFactory, Callable[[str], None]]]] = {
    "fake": fake_locks,
    "redis": redis_locks,
}


@pytest.mark.parametrize("make", LOCKS.values(), ids=LOCKS.keys())
def test_locks(make: Callable[[float], tuple[LockFactory, Callable[[str], None]]]) -> None:
    locks, take_over = make(0.05)
    with locks("cache:k") as first:
        fence = first.fence
        first.ensure_held()
        with pytest.raises(LockBusy), locks("cache:k"):
            pass
    with locks("cache:k") as second:
        assert second.fence > fence  # fences grow with every acquisition
        take_over("cache:k")
        with pytest.raises(LockLost):
            second.ensure_held()


PEER_REGISTRIES: dict[str, Callable[[], PeerRegistry]] = {
    "fake": InMemoryPeerRegistry,
    "redis": lambda: RedisPeerRegistry(fake_redis(), 3600, "unit-secret"),
}


@pytest.mark.parametrize("make", PEER_REGISTRIES.values(), ids=PEER_REGISTRIES.keys())
def test_peer_registry(make: Callable[[], PeerRegistry]) -> None:
    registry = make()
    assert registry.copies("k") == [] and registry.digests("k") is None
    partial = PeerCopy("h1", "http://h1:9809", "source", False, 0, None, 7, "origin")
    registry.announce("k", partial)
    registry.progress("k", "h1", 7, 4096)
    assert registry.copy("k", "h1") == PeerCopy(
        "h1", "http://h1:9809", "source", False, 4096, None, 7, "origin"
    )
    registry.progress("k", "h1", 6, 8192)  # another transfer's size: not this copy's
    assert registry.copy("k", "h1") == partial
    complete = PeerCopy("h2", "http://h2:9809", "entry", True, 8192, 8192)
    registry.announce("k", complete)
    assert sorted(c.host for c in registry.copies("k")) == ["h1", "h2"]
    registry.withdraw("k", "h1")
    assert registry.copies("k") == [complete]
    assert registry.copy("k", "h1") is None
    digests = ImageDigests("a" * 64, 8192, "a" * 64, 8192, "raw", "raw")
    registry.record_digests("k", digests)
    assert registry.digests("k") == digests and digests.same_bytes()


def test_peer_registry_keys_expire() -> None:
    client = fake_redis()
    registry = RedisPeerRegistry(client, 3600, "unit-secret")
    registry.announce("k", PeerCopy("h1", "http://h1:9809", "entry", True, 1, 1))
    registry.record_digests("k", ImageDigests("a" * 64, 1))
    assert all(0 < client.ttl(key) <= 3600 for key in client.scan_iter("imgprep:peers:*"))


TEMPORARIES: dict[str, Callable[[], Temporaries]] = {
    "fake": InMemoryTemporaries,
    "redis": lambda: RedisTemporaries(fake_redis()),
}
IMPORTED: dict[str, Callable[[], ImportedImages]] = {
    "fake": InMemoryImportedImages,
    "redis": lambda: RedisImportedImages(fake_redis()),
}


@pytest.mark.parametrize("make", TEMPORARIES.values(), ids=TEMPORARIES.keys())
def test_temporaries(make: Callable[[], Temporaries]) -> None:
    temporaries = make()
    assert temporaries.members("fsid/pool/img") == []
    temporaries.add("fsid/pool/img", "img.part.7")
    temporaries.add("fsid/pool/img", "img.part.3")
    temporaries.add("fsid/pool/img", "img.part.7")  # twice: one member
    temporaries.add("fsid/pool/other", "other.part.1")
    assert temporaries.members("fsid/pool/img") == ["img.part.3", "img.part.7"]
    temporaries.discard("fsid/pool/img", "img.part.3")
    temporaries.discard("fsid/pool/img", "never-added")
    assert temporaries.members("fsid/pool/img") == ["img.part.7"]
    assert temporaries.members("fsid/pool/other") == ["other.part.1"]


@pytest.mark.parametrize("make", IMPORTED.values(), ids=IMPORTED.keys())
def test_imported_images(make: Callable[[], ImportedImages]) -> None:
    imported = make()
    assert imported.recall("fsid/pool/img") is None and imported.last_used("fsid/pool/img") is None
    imported.remember("fsid/pool/img", '{"image_id": "a"}')
    imported.remember("fsid/pool/img", '{"image_id": "b"}')  # replaced
    imported.touch("fsid/pool/img")
    assert imported.recall("fsid/pool/img") == '{"image_id": "b"}'
    used = imported.last_used("fsid/pool/img")
    assert used is not None and used > 0
    assert imported.recall("fsid/pool/other") is None
    imported.forget("fsid/pool/img")
    assert imported.recall("fsid/pool/img") is None and imported.last_used("fsid/pool/img") is None
