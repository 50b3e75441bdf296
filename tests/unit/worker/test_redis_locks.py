"""Lease lock semantics on fakeredis: the edge cases, fast. tests/integration/test_locks_redis.py
runs the same promises against a real redis-server."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from domain.core.errors import LockBusy, LockLost
from tests.support.lock_watch import WatchedWaits
from worker.stores.redis_locks import FENCE_KEY, LeaseLock, RedisLockFactory
from worker.stores.replies import text


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def make(
    client: fakeredis.FakeRedis,
    name: str = "cache:k",
    *,
    lease: float = 2.0,
    renew: float = 0.5,
    wait: float = 5.0,
) -> LeaseLock:
    return LeaseLock(client, name, lease=lease, renew_every=renew, wait=wait)


def test_only_one_holder_and_fences_grow(client: fakeredis.FakeRedis) -> None:
    first, second = make(client), make(client, wait=0.05)
    fence = first.acquire()
    with pytest.raises(LockBusy, match="still held"):
        second.acquire()
    first.release()
    assert second.acquire() > fence
    second.release()


def test_release_by_a_non_owner_does_nothing(client: fakeredis.FakeRedis) -> None:
    owner, intruder = make(client), make(client)
    owner.acquire()
    # an intruder that somehow believes it holds the lock (its lease expired long ago)
    intruder._fence = 1
    assert intruder.release() is False
    assert client.get(owner.key) == owner.token.encode()
    assert owner.release() is True
    assert client.get(owner.key) is None


def test_renewal_keeps_the_lease_beyond_its_length(client: fakeredis.FakeRedis) -> None:
    lock = make(client, lease=0.6, renew=0.15)
    lock.acquire()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # observe the key across 2.5 lease periods
        assert client.get(lock.key) == lock.token.encode()
        time.sleep(0.05)
    assert not lock.lost
    lock.ensure_held()
    lock.release()


def test_a_dead_holder_loses_the_lock_after_one_lease(client: fakeredis.FakeRedis) -> None:
    # Given a holder that stops renewing (its process died): acquire, then stop the renewer
    dead = make(client, lease=0.4, renew=0.1)
    dead.acquire()
    dead._stop_renewing()
    waiter = make(client, wait=30.0)
    watched = WatchedWaits(waiter)
    # When another worker waits for the lock
    started = time.monotonic()
    waiter.acquire()
    # Then it gets it once the lease has run out: it found the lock held, blocked until the
    # lease's end (no release signal comes from a dead holder), and took it then, within a few
    # seconds of a 30 s budget
    assert watched.calls[:2] == ["attempt", "block"]
    assert watched.calls[-1] == "attempt"
    assert time.monotonic() - started < 10
    waiter.release()


def test_holder_that_lost_its_lease_cannot_publish(client: fakeredis.FakeRedis) -> None:
    # Given a holder whose key was taken over (lease expired while it was paused)
    paused = make(client)
    paused.acquire()
    paused._stop_renewing()
    client.delete(paused.key)
    usurper = make(client)
    usurper.acquire()
    # Then its fence check fails and it knows it lost the lock
    with pytest.raises(LockLost, match="taken over"):
        paused.ensure_held()
    assert paused.lost
    # and its release leaves the new holder's lock alone
    assert paused.release() is False
    usurper.ensure_held()
    usurper.release()


def test_renewal_notices_a_lost_lease(client: fakeredis.FakeRedis) -> None:
    lock = make(client, lease=1.0, renew=0.05)
    lock.acquire()
    client.set(lock.key, "someone-else")
    deadline = time.monotonic() + 2
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock.lost
    with pytest.raises(LockLost):
        lock.ensure_held()
    lock.release()


def test_waiter_wakes_on_release_not_on_a_poll(client: fakeredis.FakeRedis) -> None:
    # Given a holder with a long lease, and a waiter blocked on it
    holder = make(client, lease=30.0, renew=10.0)
    holder.acquire()
    waiter = make(client, lease=30.0, renew=10.0, wait=60.0)
    watched = WatchedWaits(waiter)
    acquired = threading.Event()

    def wait_then_note() -> None:
        waiter.acquire()
        acquired.set()

    thread = threading.Thread(target=wait_then_note)
    thread.start()
    assert watched.blocked.wait(10), "the waiter never blocked"
    # When the holder releases
    holder.release()
    # Then the release woke the waiter, which took the lock at its next attempt: two attempts,
    # one block between them (a poll would try again and again; waiting out the lease, 30 s,
    # would outlast the bound here)
    assert acquired.wait(10), "the waiter was not woken by the release"
    thread.join(timeout=5)
    assert watched.calls == ["attempt", "block", "attempt"]
    waiter.release()


def test_fence_counter_is_shared_by_all_locks(client: fakeredis.FakeRedis) -> None:
    a, b = make(client, "cache:a"), make(client, "cache:b")
    fences = [a.acquire(), b.acquire()]
    assert fences == sorted(fences) and fences[0] != fences[1]
    assert int(text(client.get(FENCE_KEY) or b"")) == fences[1]
    a.release()
    b.release()


def test_factory_uses_configured_lease(client: fakeredis.FakeRedis) -> None:
    factory = RedisLockFactory(client, lease=5.0, renew_every=1.0, wait=1.0)
    with factory("disk:vm/disk") as lock:
        assert 4000 < client.pttl(lock.key) <= 5000
    assert client.get(lock.key) is None


def test_context_manager_releases_on_error(client: fakeredis.FakeRedis) -> None:
    lock = make(client)
    with pytest.raises(RuntimeError), lock:
        raise RuntimeError("step failed")
    assert client.get(lock.key) is None
