"""A burst of boots from one uncached image: 32 concurrent prepares on 2 worker processes.

Reports the number of downloads (must be 1) and the total time against one `curl -o` of the
image plus 32 bare `qemu-img create` overlays on it. Target: ratio ≤ 1.2.

    .venv/bin/python -m bench.burst [--count 32] [--size-mib 1024] [--data-mib 256]
"""

from __future__ import annotations

import argparse
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from bench.fetch_throughput import settle
from bench.report import Figure, median, report
from bench.stack import MiB, Stack, stack, write_image
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from worker.logs import configure_logging

DISK = 2 * 1024 * MiB


def ours(made: Stack, name: str, count: int) -> tuple[float, int]:
    """Seconds for `count` concurrent prepares of a new image id; downloads it caused."""
    url = made.server.url(name)
    before = made.server.gets(name)
    image_id = f"burst-{uuid.uuid4().hex[:8]}"
    requests = [
        PrepareRequest(
            image=ImageSource(url=url, image_id=image_id),
            disk=DiskSpec(instance_id=f"vm-{uuid.uuid4().hex[:12]}", size_bytes=DISK),
        )
        for _ in range(count)
    ]
    started = time.perf_counter()
    results = [made.client.prepare_disk(r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: made.client.wait_prepared(r, timeout=600), results))
    elapsed = time.perf_counter() - started
    settle()
    return elapsed, made.server.gets(name) - before


def baseline(
    made: Stack, name: str, count: int, durable: bool = False, checksum: bool = False
) -> float:
    """One curl of the image (then its sha256sum when `checksum`, and `sync` of it when
    `durable`), then `count` qemu-img overlays on it, as a shell script."""
    work = made.root / f"bare-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    digest = f' && sha256sum "{work}/base.raw" >/dev/null' if checksum else ""
    flush = f' && sync "{work}/base.raw"' if durable else ""
    script = (
        f'curl -sS -o "{work}/base.raw" "{made.server.url(name)}"{digest}{flush} && '
        f'for i in $(seq {count}); do qemu-img create -q -f qcow2 -F raw -b "{work}/base.raw" '
        f'"{work}/disk-$i" {DISK}; done'
    )
    started = time.perf_counter()
    subprocess.run(["bash", "-c", script], check=True)
    elapsed = time.perf_counter() - started
    subprocess.run(["rm", "-rf", str(work)], check=True)
    settle()
    return elapsed


def run(count: int, size_mib: int, data_mib: int, repeat: int) -> Figure:
    with stack(workers=1, concurrency=2) as made:
        write_image(made.server.root / "burst.raw", size=size_mib * MiB, data_bytes=data_mib * MiB)
        times, bare, durable, downloads = [], [], [], []
        for _ in range(repeat):
            bare.append(baseline(made, "burst.raw", count))
            durable.append(baseline(made, "burst.raw", count, durable=True))
            seconds, fetched = ours(made, "burst.raw", count)
            times.append(seconds)
            downloads.append(fetched)
    ratio = median(times) / median(bare)
    return Figure(
        name=f"burst_uncached_{data_mib}_of_{size_mib}_mib",
        ours=median(times),
        baseline=median(bare),
        unit="s",
        target="ours/baseline <= 1.2 and 1 download",
        met=ratio <= 1.2 and set(downloads) == {1},
        notes={
            "requests": count,
            "worker": "1 worker, 2 pool processes",
            "image": f"{size_mib} MiB raw, {data_mib} MiB of data",
            "downloads per burst": downloads,
            "ours seconds": [round(t, 3) for t in times],
            "baseline seconds": [round(t, 3) for t in bare],
            "baseline with the image synced, seconds": [round(t, 3) for t in durable],
            "ours / baseline with sync": round(median(times) / median(durable), 3),
            "ours includes": "the fetch with its sha256, inspection, fsync and lease; "
            "32 entry tasks and overlay steps with their disk.info records",
        },
    )


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--data-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    report(run(args.count, args.size_mib, args.data_mib, args.repeat))


if __name__ == "__main__":
    main()
