"""Cache-hit prepare throughput: N prepares (overlay on a cached image) through real workers,
against a bare shell loop of the same qemu-img commands. Target: ours ≥ 0.7 of the loop.

    .venv/bin/python -m bench.cache_hit [--count 200] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import uuid
from pathlib import Path

from bench.report import Figure, median, report
from bench.stack import MiB, Stack, stack, write_image
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from worker.logs import configure_logging

DISK = 1024 * MiB
TICKS = os.sysconf("SC_CLK_TCK")


def worker_cpu_seconds(made: Stack) -> float:
    """CPU time (user + system) the stack's worker processes, main and pool, have used."""
    total = 0
    for worker in made.workers:
        for pid in (worker.pid, *worker.pool_pids()):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def prepares_per_second(made: Stack, url: str, image_id: str, count: int) -> float:
    requests = [
        PrepareRequest(
            image=ImageSource(url=url, image_id=image_id),
            disk=DiskSpec(instance_id=f"vm-{uuid.uuid4().hex[:12]}", size_bytes=DISK),
        )
        for _ in range(count)
    ]
    started = time.perf_counter()
    results = [made.client.prepare_disk(r) for r in requests]
    for result in results:
        made.client.wait_prepared(result, timeout=300)
    return count / (time.perf_counter() - started)


def bare_loop_per_second(made: Stack, base: str, count: int) -> float:
    target = made.root / "bare"
    target.mkdir(exist_ok=True)
    script = (
        f'for i in $(seq {count}); do qemu-img create -q -f qcow2 -F raw -b "{base}" '
        f'"{target}/disk-$i" {DISK}; done'
    )
    started = time.perf_counter()
    subprocess.run(["bash", "-c", script], check=True)
    elapsed = time.perf_counter() - started
    subprocess.run(["rm", "-rf", str(target)], check=True)
    return count / elapsed


def run(count: int, concurrency: int, rounds: int) -> Figure:
    with stack(workers=1, concurrency=concurrency) as made:
        write_image(made.server.root / "base.raw", size=64 * MiB, data_bytes=8 * MiB)
        url, image_id = made.server.url("base.raw"), "bench-base"
        warm = made.client.wait_prepared(
            made.client.prepare_disk(
                PrepareRequest(
                    image=ImageSource(url=url, image_id=image_id),
                    disk=DiskSpec(instance_id="warm", size_bytes=DISK),
                )
            ),
            timeout=120,
        )
        ours, bare, cpu_ms = [], [], []
        for _ in range(rounds):  # alternate, so both see the same machine
            bare.append(bare_loop_per_second(made, warm.base.path, count))
            before = worker_cpu_seconds(made)
            ours.append(prepares_per_second(made, url, image_id, count))
            cpu_ms.append(1000 * (worker_cpu_seconds(made) - before) / count)
    best_ours, best_bare = median(ours), median(bare)
    ratio = best_ours / best_bare
    return Figure(
        name=f"cache_hit_prepare_concurrency_{concurrency}",
        ours=best_ours,
        baseline=best_bare,
        unit="prepares/s",
        target="ours/bare >= 0.7",
        met=ratio >= 0.7,
        notes={
            "count": count,
            "worker": f"1 worker, concurrency {concurrency}",
            "ours runs/s": [round(x, 1) for x in ours],
            "bare runs/s": [round(x, 1) for x in bare],
            # the worker's main and pool processes; qemu-img's own CPU is not counted
            "worker CPU ms per prepare": round(median(cpu_ms), 2),
            "worker CPU ms per prepare, runs": [round(x, 2) for x in cpu_ms],
            "ours includes": "entry task, fetch_to_cache (cache hit), create_overlay under its "
            "lease, disk.info record, rename, fsync, result",
        },
    )


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternations; medians reported")
    args = parser.parse_args()
    report(run(args.count, args.concurrency, args.rounds))


if __name__ == "__main__":
    main()
