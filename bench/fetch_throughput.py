"""Fetch throughput: a 1 GiB image from a local HTTP server into the cache (fetch_to_cache with
its real lease lock, checksum, inspection and fsync) against `curl -o` of the same file to the
same filesystem. Target: ours ≥ 0.9 of curl's throughput.

    .venv/bin/python -m bench.fetch_throughput [--size-mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from bench.report import Figure, median, report
from domain.cache.directory import ImageCache
from domain.cache.fetch import fetch_image
from domain.cache.networks import loopback_allowed
from domain.cache.staging import FetchOptions
from domain.core.fileops import fsync_file
from domain.core.models import ImageSource
from domain.core.runner import Limits, Runner
from harness.redis_server import RedisServer
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port
from worker.logs import configure_logging
from worker.settings import FetchSettings
from worker.stores.redis_locks import RedisLockFactory

MiB = 2**20


# images are served on this host
LOOPBACK_FETCH = FetchSettings.model_validate({"denied_networks": loopback_allowed()})


def settle() -> None:
    """Let the disk finish what the last run left dirty, so it does not slow the next run."""
    os.sync()
    time.sleep(0.5)


def make_image(path: Path, size: int) -> str:
    """`size` bytes of incompressible data (no holes to skip): the hardest case for hashing."""
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for _ in range(size // (4 * MiB)):
            block = os.urandom(4 * MiB)
            digest.update(block)
            handle.write(block)
    return digest.hexdigest()


def run(size_mib: int, repeat: int) -> Figure:
    size = size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="imgprep-bench-", dir="/var/tmp") as work:
        root = Path(work)
        (root / "served").mkdir()
        (root / "cache").mkdir()
        digest = make_image(root / "served" / "image.raw", size)
        server = RedisServer(root / "redis", free_port(), appendonly=False).start()
        try:
            client = redis.Redis(host="127.0.0.1", port=server.port)
            locks = RedisLockFactory(client, lease=30, renew_every=10, wait=60)
            options = FetchOptions(
                policy=LOOPBACK_FETCH,
                limits=Limits(cpu_seconds=30, address_space_bytes=2 * 2**30),
            )
            ours, curl, durable = [], [], []
            with ImageServer(root / "served") as http:
                url = http.url("image.raw")
                for attempt in range(repeat):
                    target = root / "cache" / "curl.raw"
                    started = time.perf_counter()
                    subprocess.run(["curl", "-sS", "-o", str(target), url], check=True)
                    curl.append(time.perf_counter() - started)
                    target.unlink()
                    settle()

                    started = time.perf_counter()
                    subprocess.run(["curl", "-sS", "-o", str(target), url], check=True)
                    fsync_file(target)
                    durable.append(time.perf_counter() - started)
                    target.unlink()
                    settle()

                    source = ImageSource(
                        url=url, image_id=f"bench-{attempt}", checksum=f"sha256:{digest}"
                    )
                    started = time.perf_counter()
                    cached = fetch_image(
                        source,
                        cache=ImageCache(root / "cache"),
                        options=options,
                        runner=Runner(),
                        locks=locks,
                    )
                    ours.append(time.perf_counter() - started)
                    Path(cached.path).unlink()
                    settle()
        finally:
            server.stop()
    ours_rate = size / MiB / median(ours)
    curl_rate = size / MiB / median(curl)
    ratio = ours_rate / curl_rate
    return Figure(
        name="fetch_throughput",
        ours=ours_rate,
        baseline=curl_rate,
        unit="MiB/s",
        target="ours/curl >= 0.9",
        met=ratio >= 0.9,
        notes={
            "image": f"{size_mib} MiB of random data",
            "ours seconds": [round(s, 3) for s in ours],
            "curl seconds": [round(s, 3) for s in curl],
            "curl + fsync seconds": [round(s, 3) for s in durable],
            "ours / (curl + fsync) throughput": round(median(durable) / median(ours), 3),
            "ours includes": "sha256 check, format inspection, qemu-img info, fsync, lease lock",
        },
    )


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    report(run(args.size_mib, args.repeat))


if __name__ == "__main__":
    main()
