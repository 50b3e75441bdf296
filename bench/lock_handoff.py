"""Lock hand-off: time from a release to a waiting process holding the lock, p50 and p99.

Ours (worker.stores.redis_locks.LeaseLock: the waiter blocks on a Redis list the releaser pushes
to) against redis-py's `Lock` with its default polling (`sleep=0.1`). Target: our p50 ≤ 5 ms.

    .venv/bin/python -m bench.lock_handoff [--rounds 200]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.lock import Lock

from bench.report import Figure, percentile, report
from harness.redis_server import RedisServer
from worker.cli.demo.ports import free_port
from worker.logs import configure_logging
from worker.stores.redis_locks import LeaseLock


def hand_offs(
    acquire: Callable[[], object],
    release: Callable[[], object],
    take: Callable[[], object],
    give_back: Callable[[], object],
    rounds: int,
) -> list[float]:
    """Latencies of `rounds` hand-offs from a holder (acquire/release) to a waiter (take)."""
    latencies = []
    for _ in range(rounds):
        acquire()
        took: list[float] = []

        def wait_then_note(took: list[float] = took) -> None:
            take()
            took.append(time.perf_counter())

        waiter = threading.Thread(target=wait_then_note)
        waiter.start()
        # the waiter is blocked by now; release at a random point of a polling period
        time.sleep(random.uniform(0.005, 0.205))
        released = time.perf_counter()
        release()
        waiter.join()
        latencies.append(took[0] - released)
        give_back()
    return latencies


def run(rounds: int) -> Figure:
    with tempfile.TemporaryDirectory(prefix="imgprep-bench-") as root:
        server = RedisServer(Path(root), free_port(), appendonly=False).start()
        try:
            client = redis.Redis(host="127.0.0.1", port=server.port)

            def ours_factory() -> LeaseLock:
                return LeaseLock(client, "bench:handoff", lease=30.0, renew_every=10.0, wait=60.0)

            holder, waiter = ours_factory(), ours_factory()
            ours = hand_offs(holder.acquire, holder.release, waiter.acquire, waiter.release, rounds)

            # thread_local=False: the waiter takes the lock in a thread and gives it back from
            # the main one (redis-py keeps its token thread-local by default)
            base_holder = Lock(client, "bench:handoff-redis-py", timeout=30, thread_local=False)
            base_waiter = Lock(client, "bench:handoff-redis-py", timeout=30, thread_local=False)
            baseline = hand_offs(
                base_holder.acquire,
                base_holder.release,
                base_waiter.acquire,
                base_waiter.release,
                rounds,
            )
        finally:
            server.stop()
    p50, p99 = percentile(ours, 0.5) * 1000, percentile(ours, 0.99) * 1000
    b50, b99 = percentile(baseline, 0.5) * 1000, percentile(baseline, 0.99) * 1000
    return Figure(
        name="lock_handoff",
        ours=p50,
        baseline=b50,
        unit="ms (p50)",
        target="p50 <= 5 ms",
        met=p50 <= 5.0,
        notes={
            "ours p50/p99 ms": f"{p50:.2f} / {p99:.2f}",
            "redis-py Lock p50/p99 ms": f"{b50:.2f} / {b99:.2f}",
            "rounds": rounds,
        },
    )


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    report(run(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
