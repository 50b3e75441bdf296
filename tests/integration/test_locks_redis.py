"""Lease locks against the real redis-server, across real processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis

from domain.core.errors import LockLost
from domain.core.publish import Staged, publish_once
from harness.redis_server import RedisServer
from tests.support.lock_watch import WatchedWaits
from worker.stores.redis_locks import LeaseLock


def make(
    server: RedisServer, name: str, *, lease: float = 5.0, renew: float = 1.0, wait: float = 30.0
) -> LeaseLock:
    return LeaseLock(server.client(), name, lease=lease, renew_every=renew, wait=wait)


def _contend(url: str, name: str, rounds: int, log_path: str) -> None:
    client = redis.Redis.from_url(url)
    for _ in range(rounds):
        lock = LeaseLock(client, name, lease=5.0, renew_every=1.0, wait=30.0)
        with lock:
            with open(log_path, "a") as log:
                log.write(f"enter {os.getpid()} {time.monotonic()}\n")
            time.sleep(0.002)
            with open(log_path, "a") as log:
                log.write(f"leave {os.getpid()} {time.monotonic()}\n")


def test_mutual_exclusion_across_processes(redis_server: RedisServer, tmp_path: Path) -> None:
    # Given four processes that each take the same lock 25 times
    log_path = tmp_path / "sections.log"
    name = f"test:mutex:{os.getpid()}"
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_contend, args=(redis_server.url, name, 25, str(log_path)))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    # Then the critical sections never overlapped: enter/leave strictly alternate
    events = [line.split()[0] for line in log_path.read_text().splitlines()]
    assert len(events) == 4 * 25 * 2
    assert events == ["enter", "leave"] * (4 * 25)
    assert redis_server.client().get(f"imgprep:lock:{name}") is None


def test_a_release_hands_the_lock_to_a_blocked_waiter(redis_server: RedisServer) -> None:
    # Given a waiter blocked on a held lock, repeatedly (each round a lock of its own)
    for round_number in range(10):
        name = f"test:handoff:{os.getpid()}:{round_number}"
        holder = make(redis_server, name, lease=30.0, renew=10.0)
        holder.acquire()
        waiter = make(redis_server, name, lease=30.0, renew=10.0)
        watched = WatchedWaits(waiter)
        acquired = threading.Event()
        thread = threading.Thread(target=lambda w=waiter, a=acquired: (w.acquire(), a.set()))
        thread.start()
        assert watched.blocked.wait(10), "the waiter never blocked"
        # When the holder releases
        holder.release()
        # Then the release woke the waiter, which took the lock at its next attempt: a push,
        # not a poll (redis-py's Lock polls every 0.1 s) nor the end of the 30 s lease. The
        # hand-off's time is a benchmark's figure (bench/lock_handoff.py, BENCHMARKS.md).
        assert acquired.wait(10), "the release did not wake the waiter"
        thread.join(timeout=5)
        assert watched.calls == ["attempt", "block", "attempt"]
        waiter.release()


def _hold_forever(url: str, name: str, ready: multiprocessing.synchronize.Event) -> None:
    client = redis.Redis.from_url(url)
    LeaseLock(client, name, lease=1.0, renew_every=0.3, wait=5.0).acquire()
    ready.set()
    time.sleep(600)


def test_lock_of_a_killed_holder_expires_within_one_lease(redis_server: RedisServer) -> None:
    # Given a process that holds the lock and renews it
    name = f"test:killed:{os.getpid()}"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    proc = context.Process(target=_hold_forever, args=(redis_server.url, name, ready))
    proc.start()
    assert ready.wait(30)
    # When it is killed with SIGKILL (no release, no more renewals)
    time.sleep(1.5)  # longer than the lease: only renewal kept it alive so far
    assert redis_server.client().exists(f"imgprep:lock:{name}")
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    killed = time.monotonic()
    # Then a waiter gets the lock once the lease (1 s) has run out: well within its budget of
    # 30 s, which only renewals by a live holder could exhaust
    waiter = make(redis_server, name, lease=5.0, renew=1.0, wait=30.0)
    waiter.acquire()
    assert time.monotonic() - killed < 10
    waiter.release()


def test_fenced_publish_refuses_a_holder_whose_lease_was_taken(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Given holder A staging an artifact, and its lease taken over by B while A is "paused"
    target = tmp_path / "entry"
    name = f"test:fence:{os.getpid()}"
    a = make(redis_server, name)
    b = make(redis_server, name, wait=0.5)
    took_over = threading.Event()

    def stage_a(part: Path) -> Staged[str]:
        part.write_bytes(b"A's bytes")
        # the pause: A's lease expires and B takes the lock (driven, not slept for)
        a._stop_renewing()
        redis_server.client().delete(a.key)
        b.acquire()
        took_over.set()
        return Staged(file=part, result="A")

    # When A tries to publish
    with pytest.raises(LockLost):
        publish_once(target, find=lambda: None, lease=a, stage=stage_a)

    # Then nothing was published, B still holds the lock, and A removed its temporary (a name
    # of its own, tagged with its fence: never one the next holder writes)
    assert took_over.is_set()
    assert not target.exists()
    b.ensure_held()
    b.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # When a holder died with its temporary in place, the next holder removes it first
    (tmp_path / "entry.part.1").write_bytes(b"dead holder's bytes")

    def stage_c(part: Path) -> Staged[str]:
        assert sorted(p.name for p in tmp_path.iterdir()) == []
        part.write_bytes(b"C's bytes")
        return Staged(file=part, result="C")

    assert (
        publish_once(target, find=lambda: None, lease=make(redis_server, name), stage=stage_c)
        == "C"
    )
    assert target.read_bytes() == b"C's bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
