"""A fleet without shared storage: one new image prepared on 8 hosts at once.

Every host is an `imgprep worker` with a host id of its own; in host scope each has its own
cache directory and peer server on loopback, every peer's upload limited to the origin's rate
(peer links as fast as the origin's). Measured in one run, on the same image and origin:

* ours: host scope with peers — origin bytes, and the time until the last host's disk is ready;
* one download: `curl -o` of the image from the origin (the time goal's unit);
* Nova's per-host `_base`: 8 independent downloads at once (8 `curl -o`);
* one shared directory: imgprep in shared scope, 8 hosts' workers on one cache directory.

Goals: origin bytes <= 1.05 x the image; the last host ready <= 1.3 x one download.

    .venv/bin/python -m bench.fleet [--hosts 8] [--size-mib 64] [--rate-mib 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery

from bench.fetch_throughput import settle
from bench.report import Figure, median, report
from bench.stack import CONFIG
from domain.cache.networks import loopback_allowed
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from harness.redis_server import RedisServer
from worker.app.application import create_app
from worker.cli.client import Client
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port
from worker.cli.demo.worker_processes import WorkerProcess, start_worker
from worker.logs import configure_logging
from worker.settings import Settings

MiB = 2**20
SECRET = "bench-fleet-secret"  # noqa: S105 - the peers of a benchmark on loopback


@dataclass
class FleetStack:
    root: Path
    redis: RedisServer
    origin: ImageServer
    app: Celery
    hosts: list[str]
    workers: list[WorkerProcess] = field(default_factory=list)

    def prepare_everywhere(self, name: str) -> float:
        """Seconds until a prepare of a new image id on every host has its disk."""
        client = Client(self.app)
        image_id = f"fleet-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        results = [
            client.prepare_disk(
                PrepareRequest(
                    image=ImageSource(url=self.origin.url(name), image_id=image_id),
                    disk=DiskSpec(instance_id=f"vm-{uuid.uuid4().hex[:12]}", size_bytes=GiB),
                    host=host,
                )
            )
            for host in self.hosts
        ]
        with ThreadPoolExecutor(len(results)) as pool:
            list(pool.map(lambda r: client.wait_prepared(r, timeout=600), results))
        return time.perf_counter() - started


GiB = 2**30


@contextmanager
def fleet_stack(
    root: Path, origin: ImageServer, hosts: int, scope: str, rate: int
) -> Iterator[FleetStack]:
    """`hosts` workers, one per host id, on a Redis of their own; in host scope each with its
    own directories and peer port, in shared scope all on one cache directory."""
    run = root / f"{scope}-{uuid.uuid4().hex[:6]}"
    redis = RedisServer(run / "redis", free_port(), appendonly=True).start()
    common = {
        **os.environ,
        "IMGPREP_CONFIG": str(CONFIG),  # the checkout's defaults, not this host's /etc/imgprep
        "IMGPREP_REDIS_URL": redis.url,
        "IMGPREP_LOG_FORMAT": "json",
        "IMGPREP_LOG_LEVEL": "WARNING",
        "IMGPREP_METRICS__ENABLED": "false",
        "IMGPREP_FETCH__DENIED_NETWORKS": json.dumps(loopback_allowed()),
        "IMGPREP_IMAGE_CACHE__SCOPE": scope,
        "IMGPREP_PEER__SECRET": SECRET,
        "IMGPREP_PEER__ADDRESS": "127.0.0.1",
        "IMGPREP_PEER__ALLOWED_NETWORKS": '["127.0.0.1/32"]',  # a fleet on one machine
        "IMGPREP_PEER__MAX_BYTES_PER_SECOND": str(rate),
        "IMGPREP_HOSTS__SILENT_AFTER_SECONDS": "120",
        "IMGPREP_HOSTS__ABANDON_AFTER_SECONDS": "300",
    }
    names = [f"host{index}" for index in range(hosts)]
    settings = Settings(
        redis_url=redis.url,
        image_cache={"scope": scope},
        peer={"secret": SECRET},
    )
    made = FleetStack(run, redis, origin, create_app(settings), names)
    try:
        for name in names:
            own = run / (name if scope == "host" else "shared")
            env = {
                **common,
                "IMGPREP_HOST_ID": name,
                "IMGPREP_CACHE_DIR": str(own / "cache"),
                "IMGPREP_INSTANCES_DIR": str(run / name / "instances"),
                "IMGPREP_STATE_DIR": str(run / name / "state"),
                "IMGPREP_PEER__PORT": str(free_port()),
            }
            made.workers.append(
                start_worker(
                    nodename=f"{name}-{uuid.uuid4().hex[:6]}@bench",
                    log_path=run / "logs" / f"{name}.log",
                    env=env,
                    concurrency=1,
                )
            )
        for worker in made.workers:
            worker.wait_ready(made.app, timeout=120)
        yield made
    finally:
        for worker in made.workers:
            worker.stop(timeout=20)
        redis.stop()
        subprocess.run(["rm", "-rf", str(run)], check=False)


def curl_all(origin: ImageServer, name: str, count: int, work: Path) -> float:
    """Seconds for `count` `curl -o` of the image at once (Nova's per-host `_base`)."""
    work.mkdir(exist_ok=True)
    started = time.perf_counter()
    processes = [
        subprocess.Popen(["curl", "-sS", "-o", str(work / f"base-{index}"), origin.url(name)])
        for index in range(count)
    ]
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError("curl failed")
    elapsed = time.perf_counter() - started
    subprocess.run(["rm", "-rf", str(work)], check=True)
    return elapsed


def measure(origin: ImageServer, what: object) -> tuple[float, int]:
    """(seconds, origin bytes) of one run of `what()`."""
    before = origin.bytes_sent
    seconds = what()  # type: ignore[operator]
    settle()
    return float(seconds), origin.bytes_sent - before


def run(hosts: int, size_mib: int, rate_mib: int, repeat: int) -> Figure:
    size, rate = size_mib * MiB, rate_mib * MiB
    with tempfile.TemporaryDirectory(prefix="imgprep-bench-fleet-", dir="/var/tmp") as work:
        root = Path(work)
        (root / "served").mkdir()
        with open(root / "served" / "fleet.raw", "wb") as image:
            for _ in range(size // (4 * MiB)):
                image.write(os.urandom(4 * MiB))
        origin = ImageServer(root / "served").start()
        origin.bytes_per_second = rate
        figures: dict[str, list[tuple[float, int]]] = {
            "one": [],
            "nova": [],
            "shared": [],
            "ours": [],
        }
        try:
            for _ in range(repeat):
                figures["one"].append(
                    measure(origin, lambda: curl_all(origin, "fleet.raw", 1, root / "one"))
                )
                figures["nova"].append(
                    measure(origin, lambda: curl_all(origin, "fleet.raw", hosts, root / "nova"))
                )
            with fleet_stack(root, origin, hosts, "shared", rate) as shared:
                for _ in range(repeat):
                    figures["shared"].append(
                        measure(origin, lambda: shared.prepare_everywhere("fleet.raw"))
                    )
            with fleet_stack(root, origin, hosts, "host", rate) as ours:
                for _ in range(repeat):
                    figures["ours"].append(
                        measure(origin, lambda: ours.prepare_everywhere("fleet.raw"))
                    )
        finally:
            origin.stop()
    seconds = {k: median([s for s, _ in v]) for k, v in figures.items()}
    origin_bytes = {k: max(b for _, b in v) for k, v in figures.items()}
    time_ratio = seconds["ours"] / seconds["one"]
    bytes_ratio = origin_bytes["ours"] / size
    return Figure(
        name=f"fleet_{hosts}_hosts_{size_mib}_mib",
        ours=seconds["ours"],
        baseline=seconds["one"],
        unit="s",
        target="last host ready <= 1.3 x one download; origin bytes <= 1.05 x image",
        met=time_ratio <= 1.3 and bytes_ratio <= 1.05,
        notes={
            "hosts": hosts,
            "image": f"{size_mib} MiB of random data (raw)",
            "origin and peer links": f"{rate_mib} MiB/s each",
            "origin bytes / image, ours (host scope, peers)": round(bytes_ratio, 3),
            "origin bytes / image, Nova per-host _base (8 curl)": round(
                origin_bytes["nova"] / size, 3
            ),
            "origin bytes / image, shared directory": round(origin_bytes["shared"] / size, 3),
            "last host ready / one download, ours": round(time_ratio, 3),
            "last host ready / one download, Nova per-host _base": round(
                seconds["nova"] / seconds["one"], 3
            ),
            "last host ready / one download, shared directory": round(
                seconds["shared"] / seconds["one"], 3
            ),
            "seconds": {k: [round(s, 3) for s, _ in v] for k, v in figures.items()},
        },
    )


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rate-mib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    report(run(args.hosts, args.size_mib, args.rate_mib, args.repeat))


if __name__ == "__main__":
    main()
