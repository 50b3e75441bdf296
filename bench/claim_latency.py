"""Claim latency: how long a message published to a queue an idle worker consumes waits before the
worker claims it (takes it and records it as unacknowledged, in one step:
worker/delivery/broker.py), p50 and p99, with Redis at hz 10 (its default) and hz 100.

Ours: one real `imgprep worker` (default concurrency) consuming three queues (the shared one, its
host's, and one more added by a control command), one message at a time after an idle pause,
each on a queue drawn at random (a round robin would favour a worker that watches its queues in
turn: the one it watches next would be the next one used). Baseline, in the same run on the same
Redis: a bare consumer thread that waits with BRPOP on three other queues and then records the
message with HSET (kombu's way: pop first, record after). Both are read in Redis's own clock from
MONITOR: from the LPUSH that published the message to the command that recorded it (ours: the
claim script's EVAL). Target: ours p50 ≤ 5 ms and p99 ≤ 20 ms at both hz.

    .venv/bin/python -m bench.claim_latency [--messages 120]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid

import redis

from bench.report import Figure, median, percentile, report
from bench.stack import Stack, stack
from harness.redis_monitor import CommandLog
from worker.app.routing import DEFAULT_QUEUE, host_queue
from worker.logs import configure_logging

EXTRA_QUEUE = "bench.extra"
BARE_QUEUES = ("bench.bare.0", "bench.bare.1", "bench.bare.2")
BARE_RECORDS = "bench:bare:unacked"


def idle() -> None:
    time.sleep(random.uniform(0.15, 0.45))  # any periodic wait is at a random phase


def ours(made: Stack, queues: tuple[str, ...], messages: int) -> None:
    for _ in range(messages):
        idle()
        made.app.send_task("imgprep.ping", queue=random.choice(queues)).get(timeout=30)


def bare(client: redis.Redis, messages: int) -> None:
    """A consumer thread that pops with BRPOP, then records what it popped; messages pushed to it
    one at a time after an idle pause."""
    taken = threading.Semaphore(0)
    done = threading.Event()

    def consume() -> None:
        consumer = redis.Redis(connection_pool=client.connection_pool)
        while not done.is_set():
            popped = consumer.brpop(list(BARE_QUEUES), timeout=1)
            if popped:
                consumer.hset(BARE_RECORDS, uuid.uuid4().hex, popped[1])
                taken.release()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    for _ in range(messages):
        idle()
        client.lpush(random.choice(BARE_QUEUES), b"{}")
        taken.acquire(timeout=30)
    done.set()
    thread.join(5)
    client.delete(BARE_RECORDS)


def run(messages: int) -> list[Figure]:
    figures = []
    with stack(workers=1, concurrency=4) as made:
        client = made.redis_server.client()
        worker = made.workers[0]
        made.app.control.add_consumer(EXTRA_QUEUE, destination=[worker.nodename], reply=True)
        queues = (DEFAULT_QUEUE, host_queue(made.settings.host_id), EXTRA_QUEUE)
        ours(made, queues, 6)  # warm: the worker's pool has run a task
        for hz in (10, 100):
            client.config_set("hz", hz)
            monitor = CommandLog(made.redis_server.client(), record_key=BARE_RECORDS).start()
            ours(made, queues, messages)
            bare(client, messages)
            monitor.stop()
            claimed = monitor.waits(queues, "claim")
            recorded = monitor.waits(BARE_QUEUES, "record")
            p50, p99 = median(claimed) * 1000, percentile(claimed, 0.99) * 1000
            figures.append(
                report(
                    Figure(
                        name=f"claim_latency_hz{hz}",
                        ours=p50,
                        baseline=median(recorded) * 1000,
                        unit="ms (p50)",
                        target="ours p50 <= 5 ms and p99 <= 20 ms",
                        met=p50 <= 5 and p99 <= 20,
                        notes={
                            "messages": f"{len(claimed)} ours, {len(recorded)} baseline",
                            "ours p99 ms": round(p99, 2),
                            "ours max ms": round(max(claimed) * 1000, 2),
                            "baseline p99 ms": round(percentile(recorded, 0.99) * 1000, 2),
                            "queues": "3 (shared, host, one added), one drawn at random",
                            "ours": "LPUSH → the worker's claim script (pop and record)",
                            "baseline": "LPUSH → a bare consumer's HSET after its BRPOP",
                        },
                    )
                )
            )
        client.config_set("hz", 10)
    return figures


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=120)
    run(parser.parse_args().messages)


if __name__ == "__main__":
    main()
