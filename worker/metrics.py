"""Prometheus metrics of a worker, served by its main process at http://<address>:<port>/metrics.

The prefork pool runs tasks in several processes, so the metrics use prometheus-client's
multiprocess mode: `imgprep worker` points PROMETHEUS_MULTIPROC_DIR at a fresh directory of its
own (worker.metrics_dir) before anything imports prometheus_client; every pool process writes
its values there, and the endpoint sums them. Mounts and loop devices are counted from the
kernel's tables at scrape time, so they are right whichever process made them, and after a crash.

The metrics, their types, labels and meanings are listed in README ("Metrics").
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
from celery import Task
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from domain.core.models import CacheEvictionReport
from domain.core.ports import Progress
from worker.settings import Settings

log = structlog.get_logger(__name__)

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)

CACHE_REQUESTS = Counter(
    "imgprep_cache_requests",
    "fetch_to_cache calls by outcome: hit (found in the cache) or miss (downloaded).",
    ["outcome"],
)
FETCHED_BYTES = Counter("imgprep_fetched_bytes", "Bytes downloaded from image sources.")
RBD_IMPORTS = Counter(
    "imgprep_rbd_imports",
    "import_to_rbd calls by outcome: imported (into the cluster) or found (already there).",
    ["outcome"],
)
STEP_DURATION = Histogram(
    "imgprep_step_duration_seconds",
    "Wall time of each step run, by step and outcome (success, failure, retry).",
    ["step", "outcome"],
    buckets=DURATION_BUCKETS,
)
STEP_RETRIES = Counter(
    "imgprep_step_retries", "Retries scheduled by steps, by error class.", ["step", "error"]
)
LOCK_WAIT = Histogram(
    "imgprep_lock_wait_seconds",
    "Time spent waiting for a lease lock, by lock kind and outcome (acquired, busy).",
    ["lock", "outcome"],
    buckets=WAIT_BUCKETS,
)
CACHE_EVICTIONS = Counter(
    "imgprep_cache_evictions", "Cache entries removed by the cache manager.", ["reason"]
)
CACHE_EVICTED_BYTES = Counter(
    "imgprep_cache_evicted_bytes", "Bytes on disk of the cache entries removed."
)

_started: dict[str, float] = {}


def lock_waited(name: str, seconds: float, *, acquired: bool) -> None:
    kind = name.split(":", 1)[0]
    LOCK_WAIT.labels(kind, "acquired" if acquired else "busy").observe(seconds)


class FetchMeter:
    """A Progress that counts downloaded bytes as they are reported, passing reports on."""

    def __init__(self, inner: Progress) -> None:
        self.inner = inner
        self.downloaded = False
        self._last = 0

    def __call__(self, done: int, total: int | None) -> None:
        if not self.downloaded or done < self._last:
            self._last = 0  # a new download
        self.downloaded = True
        FETCHED_BYTES.inc(max(0, done - self._last))
        self._last = done
        self.inner(done, total)

    def count_request(self) -> None:
        CACHE_REQUESTS.labels("miss" if self.downloaded else "hit").inc()


def count_rbd_import(*, imported: bool) -> None:
    """An import_to_rbd step ended: it imported the image, or found it in the cluster."""
    RBD_IMPORTS.labels("imported" if imported else "found").inc()


def count_cache_hit() -> None:
    """An entry task found the image cached (and needs no fetch step)."""
    CACHE_REQUESTS.labels("hit").inc()


def count_evictions(report: CacheEvictionReport) -> None:
    """The entries a pass of the cache manager removed (none in a dry run)."""
    if report.dry_run:
        return
    for item in report.evicted:
        CACHE_EVICTIONS.labels(item.reason).inc()
        CACHE_EVICTED_BYTES.inc(item.size_on_disk)


def _step(task: Task) -> str | None:
    return str(task.name).removeprefix("imgprep.") if getattr(task, "journaled", False) else None


def step_started(task_id: str, task: Task, **_: Any) -> None:
    if _step(task):
        _started[task_id] = time.monotonic()


def step_ended(task_id: str, task: Task, state: str | None = None, **_: Any) -> None:
    started = _started.pop(task_id, None)
    step = _step(task)
    if step and started is not None and state in ("SUCCESS", "FAILURE", "RETRY"):
        STEP_DURATION.labels(step, state.lower()).observe(time.monotonic() - started)


def step_retried(sender: Task, reason: object = None, **_: Any) -> None:
    step = _step(sender)
    if step:
        cause = getattr(reason, "exc", None) or reason  # celery.exceptions.Retry wraps the error
        STEP_RETRIES.labels(step, type(cause).__name__).inc()


# -- the endpoint ------------------------------------------------------------------------------


class HeldResources(Collector):
    """Mounts and loop devices under imgprep's directories, read from the kernel at scrape."""

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self.roots = tuple(str(root.resolve()) + "/" for root in roots)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "imgprep_mounts_held",
            "Mounts under imgprep's cache, instances and state directories now.",
            value=sum(1 for point in mount_points() if point.startswith(self.roots)),
        )
        yield GaugeMetricFamily(
            "imgprep_loop_devices_held",
            "Loop devices whose backing file lies under imgprep's directories now.",
            value=sum(1 for back in loop_backing_files() if back.startswith(self.roots)),
        )


def mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 1:
            points.append(fields[1].encode().decode("unicode_escape") + "/")
    return points


def loop_backing_files() -> list[str]:
    files = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            files.append(backing.read_text().strip())
        except OSError:
            continue
    return files


def serve(settings: Settings) -> None:
    """Start the endpoint in this (the worker's main) process; a port in use is logged, not
    fatal: the worker's job matters more than its metrics."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(
        HeldResources((settings.cache_dir, settings.instances_dir, settings.state_dir))
    )
    try:
        start_http_server(settings.metrics.port, settings.metrics.address, registry=registry)
    except OSError as error:
        log.error(
            "metrics_endpoint_failed",
            address=settings.metrics.address,
            port=settings.metrics.port,
            error=error.strerror,
        )
        return
    log.info(
        "metrics_endpoint_started", address=settings.metrics.address, port=settings.metrics.port
    )


def serve_metrics(**_: Any) -> None:
    from worker.settings import get_settings

    settings = get_settings()
    if settings.metrics.enabled:
        serve(settings)


def pool_process_ended(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]
