"""A worker's Prometheus endpoint, scraped after real runs: cache hits and misses, bytes fetched,
step durations by outcome, retries, lock waits, and mounts held, summed over the pool."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from harness.redis_server import RedisServer
from tests.conftest import need_root, write_raw_image
from tests.integration.conftest import Cluster, make_cluster, unique
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port
from worker.cli.demo.worker_processes import WorkerProcess

MiB = 2**20


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, int]]:
    """A cluster of its own (so that only its worker's counters move) with metrics on."""
    root = tmp_path_factory.mktemp("metrics")
    server = RedisServer(root / "redis", free_port()).start()
    port = free_port()
    cluster = make_cluster(
        root,
        server,
        {
            "IMGPREP_METRICS__ENABLED": "true",
            "IMGPREP_METRICS__ADDRESS": "127.0.0.1",
            "IMGPREP_METRICS__PORT": str(port),
        },
    )
    try:
        cluster.workers.append(cluster.start_worker("metered", concurrency=2))
        yield cluster, port
    finally:
        for worker in cluster.workers:
            worker.stop()
        server.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) → value."""
    response = urllib3.PoolManager().request(
        "GET", f"http://127.0.0.1:{port}/metrics", timeout=10, retries=False
    )
    assert response.status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.data.decode())
        for sample in family.samples
    }


DURATION_COUNT = "imgprep_step_duration_seconds_count"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_until(port: int, done: Callable[[Samples], bool], timeout: float = 30) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def prepare(cluster: Cluster, url: str, image_id: str, checksum: str | None = None) -> object:
    request = {
        "image": {"url": url, "image_id": image_id, "checksum": checksum},
        "disk": {"instance_id": unique("vm"), "size_bytes": 64 * MiB},
    }
    return cluster.client.send("imgprep.prepare_disk", request)


def test_metrics_after_hits_misses_retries_and_a_failure(
    metered: tuple[Cluster, int], image_server: ImageServer
) -> None:
    cluster, port = metered
    # Given three served images, the second failing its first GET with a 503
    names = []
    for size in (6 * MiB, 4 * MiB, 2 * MiB):
        name = unique("metrics") + ".raw"
        write_raw_image(image_server.root / name, size=size, data=os.urandom(64 * 1024))
        names.append(name)
    image_server.fail_next(names[1], 503, times=1)
    first_id = unique("img")

    # When the first is prepared twice (a miss, then a hit), the second once (after a retry)
    # and the third with a wrong checksum (a failure)
    prepare(cluster, image_server.url(names[0]), first_id).get(timeout=60)  # type: ignore[attr-defined]
    runs = [
        prepare(cluster, image_server.url(names[0]), first_id),
        prepare(cluster, image_server.url(names[1]), unique("img")),
    ]
    for run in runs:
        run.get(timeout=60)  # type: ignore[attr-defined]
    failing = prepare(cluster, image_server.url(names[2]), unique("img"), "sha256:" + "0" * 64)
    with pytest.raises(Exception, match="expected sha256"):
        failing.get(timeout=60)  # type: ignore[attr-defined]
    # (a step's result is stored before its postrun handler records its duration)
    samples = scrape_until(
        port,
        lambda found: (
            value(found, DURATION_COUNT, step="fetch_to_cache", outcome="failure") == 1
            and value(found, DURATION_COUNT, step="create_overlay", outcome="success") == 3
        ),
    )

    # Then the endpoint counts them, summed over the worker's pool processes
    assert value(samples, "imgprep_cache_requests_total", outcome="miss") == 2
    assert value(samples, "imgprep_cache_requests_total", outcome="hit") == 1
    assert value(samples, "imgprep_fetched_bytes_total") == 6 * MiB + 4 * MiB + 2 * MiB
    fetch = {"step": "fetch_to_cache"}
    # the hit was found by the entry task: no fetch step ran for it
    assert value(samples, "imgprep_step_duration_seconds_count", **fetch, outcome="success") == 2
    assert value(samples, "imgprep_step_duration_seconds_count", **fetch, outcome="retry") == 1
    assert value(samples, "imgprep_step_duration_seconds_count", **fetch, outcome="failure") == 1
    overlay = {"step": "create_overlay", "outcome": "success"}
    assert value(samples, "imgprep_step_duration_seconds_count", **overlay) == 3
    assert value(samples, "imgprep_step_duration_seconds_sum", **overlay) > 0
    assert value(samples, "imgprep_step_retries_total", **fetch, error="SourceUnavailable") == 1
    assert value(samples, "imgprep_lock_wait_seconds_count", lock="cache", outcome="acquired") >= 3
    assert value(samples, "imgprep_lock_wait_seconds_count", lock="disk", outcome="acquired") == 3
    assert ("imgprep_mounts_held", ()) in samples
    assert ("imgprep_loop_devices_held", ()) in samples


def test_mounts_held_follows_the_kernels_mount_table(metered: tuple[Cluster, int]) -> None:
    need_root()
    cluster, port = metered
    # Given nothing mounted under the worker's directories
    before = value(scrape(port), "imgprep_mounts_held")
    target = cluster.settings.state_dir / f"mnt-{uuid.uuid4().hex[:6]}"
    target.mkdir()
    try:
        # When a filesystem is mounted under the state directory
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "imgprep-test", str(target)], check=True
        )
        during = value(scrape(port), "imgprep_mounts_held")
    finally:
        subprocess.run(["umount", str(target)], check=False)
        target.rmdir()
    after = value(scrape(port), "imgprep_mounts_held")

    # Then the gauge counts it while it is there, and not after
    assert (before, during, after) == (0, 1, 0)


def test_pool_processes_write_to_the_workers_own_metrics_directory(
    metered: tuple[Cluster, int],
) -> None:
    # Given the metered worker after the runs above
    cluster, _ = metered
    worker: WorkerProcess = cluster.workers[0]

    # When its metrics directory is listed
    directory = cluster.settings.state_dir / "metrics" / str(worker.pid)
    files = sorted(p.name for p in directory.iterdir())

    # Then it holds the value files of this worker's own processes, and no other worker's
    writers = {int(name.rsplit("_", 1)[1].removesuffix(".db")) for name in files}
    assert any(name.startswith("counter_") for name in files), files
    assert writers and writers <= {worker.pid, *worker.pool_pids()}
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(directory)
