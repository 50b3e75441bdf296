"""The device ledger in Redis (on fakeredis): one owner per disk, resources in order."""

from __future__ import annotations

import fakeredis
import pytest

from domain.core.errors import DiskBusy
from domain.disks.device_records import LoopDevice, WorkDir
from domain.guest.context import Claim
from worker.stores.redis_ledger import RedisDeviceLedger


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def ledger(client: fakeredis.FakeRedis) -> RedisDeviceLedger:
    return RedisDeviceLedger(client, "host-1")


def test_one_owner_at_a_time_and_only_the_owner_drops(
    ledger: RedisDeviceLedger, client: fakeredis.FakeRedis
) -> None:
    first = ledger.claim("vm/disk", "op-a", "w1")
    assert ledger.claim("vm/disk", "op-a", "w2").owner == "op-a"  # the same operation again
    with pytest.raises(DiskBusy, match="held by operation op-a"):
        ledger.claim("vm/disk", "op-b", "w1")
    ledger.drop("vm/disk", "op-b")
    assert ledger.get("vm/disk") is not None
    ledger.drop("vm/disk", "op-a")
    assert ledger.get("vm/disk") is None
    assert client.exists("imgprep:devices:host-1") == 0  # no key left once the host is empty
    assert first.resources == ()


def test_claim_notes_resources_in_order_and_updates_in_place(ledger: RedisDeviceLedger) -> None:
    claim = Claim(ledger, ledger.claim("vm/disk", "op-a", "w1"))
    claim.note(WorkDir(path="/s/vm/disk"))
    claim.note(LoopDevice(backing="/s/export", offset=512, size=1024))
    claim.note(LoopDevice(backing="/s/export", offset=512, size=1024, device="/dev/loop3"))
    stored = ledger.get("vm/disk")
    assert stored is not None
    assert [r.kind for r in stored.resources] == ["workdir", "loop"]
    assert (
        isinstance(stored.resources[1], LoopDevice) and stored.resources[1].device == "/dev/loop3"
    )
