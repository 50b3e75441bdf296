"""Sparse and convert: a 4 GiB-virtual qcow2 holding ~200 MiB of data, fetched with force_raw.

Two figures: the allocated bytes of the raw cache entry over the data bytes (target ≤ 1.1), and
the time of imgprep's conversion (qemu-img convert as fetch_to_cache runs it: format pinned,
cache mode by the O_DIRECT probe, progress parsed from -p) against a bare
`qemu-img convert -f qcow2 -O raw` of the same file on the same filesystem (target ≤ 1.1).

    .venv/bin/python -m bench.sparse_convert [--repeat 3]
"""

from __future__ import annotations

import argparse
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
from domain.formats import qemu_img
from domain.formats.conversion import cache_mode_for
from harness.redis_server import RedisServer
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port
from worker.logs import configure_logging
from worker.settings import FetchSettings
from worker.stores.redis_locks import RedisLockFactory

MiB = 2**20
VIRTUAL = 4 * 1024 * MiB
DATA = 200 * MiB
LIMITS = Limits(cpu_seconds=30, address_space_bytes=2 * 2**30)


# images are served on this host
LOOPBACK_FETCH = FetchSettings.model_validate({"denied_networks": loopback_allowed()})


def make_qcow2(work: Path) -> Path:
    """50 runs of 4 MiB of random data spread over 4 GiB, as a qcow2."""
    raw = work / "source.raw"
    with open(raw, "wb") as handle:
        handle.truncate(VIRTUAL)
        step = VIRTUAL // 50
        for index in range(50):
            handle.seek(index * step)
            handle.write(os.urandom(DATA // 50))
    image = work / "served" / "image.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True
    )
    raw.unlink()
    return image


def run(repeat: int) -> tuple[Figure, Figure]:
    with tempfile.TemporaryDirectory(prefix="imgprep-bench-", dir="/var/tmp") as directory:
        work = Path(directory)
        (work / "served").mkdir()
        (work / "cache").mkdir()
        image = make_qcow2(work)
        server = RedisServer(work / "redis", free_port(), appendonly=False).start()
        try:
            locks = RedisLockFactory(
                redis.Redis(host="127.0.0.1", port=server.port), lease=30, renew_every=10, wait=60
            )
            options = FetchOptions(
                policy=LOOPBACK_FETCH,
                limits=LIMITS,
                force_raw=True,
            )
            with ImageServer(work / "served") as http:
                cached = fetch_image(
                    ImageSource(url=http.url("image.qcow2"), image_id="sparse"),
                    cache=ImageCache(work / "cache"),
                    options=options,
                    runner=Runner(),
                    locks=locks,
                )
            allocated = os.stat(cached.path).st_blocks * 512
        finally:
            server.stop()
        mode = cache_mode_for(work / "cache")
        ours, bare, durable = [], [], []
        for attempt in range(repeat):
            target = work / "cache" / f"bare-{attempt}.raw"
            started = time.perf_counter()
            subprocess.run(
                ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(target)],
                check=True,
            )
            bare.append(time.perf_counter() - started)
            target.unlink()
            started = time.perf_counter()
            subprocess.run(
                ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(target)],
                check=True,
            )
            fsync_file(target)
            durable.append(time.perf_counter() - started)
            target.unlink()
            target = work / "cache" / f"ours-{attempt}.raw"
            started = time.perf_counter()
            qemu_img.convert(
                Runner(),
                image,
                target,
                source_format="qcow2",
                target_format="raw",
                cache_mode=cache_mode_for(target.parent),
                needed=VIRTUAL,
                on_progress=lambda percent: None,
            )
            ours.append(time.perf_counter() - started)
            target.unlink()
    sparse = Figure(
        name="sparse_cache_entry",
        ours=allocated / MiB,
        baseline=DATA / MiB,
        unit="MiB",
        target="allocated/data <= 1.1",
        met=allocated / DATA <= 1.1,
        notes={"virtual size": "4 GiB", "qcow2 data": "200 MiB in 50 runs"},
    )
    convert = Figure(
        name="force_raw_conversion",
        ours=median(ours),
        baseline=median(bare),
        unit="s",
        target="ours/bare <= 1.1",
        met=median(ours) / median(bare) <= 1.1,
        notes={
            "ours seconds": [round(t, 3) for t in ours],
            "bare seconds": [round(t, 3) for t in bare],
            "ours": f"-t {mode} (data on disk when it returns), -p parsed",
            "bare": "qemu-img convert defaults (target cache 'unsafe': no flush)",
            "bare + fsync seconds": [round(t, 3) for t in durable],
            "ours / (bare + fsync)": round(median(ours) / median(durable), 3),
        },
    )
    return sparse, convert


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    for figure in run(parser.parse_args().repeat):
        report(figure)


if __name__ == "__main__":
    main()
