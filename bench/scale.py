"""Scale: the cost of a cache-hit prepare as the cache holds 10, 100 and 1000 images, and as one
base carries 1, 100 and 1000 overlays. It must stay flat: every figure within 1.25 x the
smallest configuration's (the baseline here is imgprep itself at the smallest scale).

    .venv/bin/python -m bench.scale [--samples 40]
"""

from __future__ import annotations

import argparse
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from bench.report import Figure, median, report
from bench.stack import MiB, Stack, stack, write_image
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from worker.logs import configure_logging

DISK = 1024 * MiB


def prepare_many(made: Stack, image_id: str, url: str, count: int) -> None:
    results = [
        made.client.prepare_disk(
            PrepareRequest(
                image=ImageSource(url=url, image_id=image_id),
                disk=DiskSpec(instance_id=f"vm-{uuid.uuid4().hex[:12]}", size_bytes=DISK),
            )
        )
        for _ in range(count)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: made.client.wait_prepared(r, timeout=600), results))


def latency(made: Stack, image_id: str, url: str, samples: int) -> float:
    """Median seconds of one cache-hit prepare, sent one after the other."""
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        prepare_many(made, image_id, url, 1)
        times.append(time.perf_counter() - started)
    return median(times)


def run(samples: int) -> Figure:
    with stack(workers=1, concurrency=2) as made:
        write_image(made.server.root / "tiny.raw", size=MiB, data_bytes=64 * 1024)
        url = made.server.url("tiny.raw")
        target = "scale-target"
        prepare_many(made, target, url, 1)
        by_entries: dict[int, float] = {}
        cached = 1
        for entries in (10, 100, 1000):
            for image in range(cached, entries):
                prepare_many(made, f"scale-other-{image}", url, 1)
            cached = entries
            by_entries[entries] = latency(made, target, url, samples)
        by_overlays: dict[int, float] = {}
        overlays = samples * 3 + 1  # the target already has the overlays of the samples above
        for wanted in (100, 1000):
            if wanted > overlays:
                prepare_many(made, target, url, wanted - overlays)
                overlays = wanted
            by_overlays[wanted] = latency(made, target, url, samples)
            overlays += samples
    smallest = by_entries[10]
    worst = max([*by_entries.values(), *by_overlays.values()])
    return Figure(
        name="scale_cache_hit",
        ours=worst * 1000,
        baseline=smallest * 1000,
        unit="ms (median)",
        target="every scale within 1.25 x the smallest",
        met=worst <= 1.25 * smallest,
        notes={
            "ms by cached images": {k: round(v * 1000, 2) for k, v in by_entries.items()},
            "ms by overlays of the base": {k: round(v * 1000, 2) for k, v in by_overlays.items()},
            "samples per point": samples,
        },
    )


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=40)
    report(run(parser.parse_args().samples))


if __name__ == "__main__":
    main()
