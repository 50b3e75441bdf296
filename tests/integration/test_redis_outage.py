"""Redis stopped and restarted under load: every request finishes, nothing is lost, and the
workers consume again afterwards (proved by a real round trip, not a log line)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from celery.result import AsyncResult

from domain.cache.directory import cache_key
from domain.core.models import PreparedDisk
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, ClusterFactory, unique
from tests.integration.test_reliability import request_for
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer

MiB = 2**20
OUTAGE_SECONDS = 6.0


def wait_through_outages(cluster: Cluster, task_id: str, timeout: float) -> PreparedDisk:
    """The operation's result, read as a control plane would: reconnecting after a restart."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return cluster.client.wait_prepared(cluster.app.AsyncResult(task_id), timeout=10)
        except Exception:  # the client's own connection to Redis, lost while it was down
            if time.monotonic() > deadline:
                raise


def stop_redis_for(cluster: Cluster, seconds: float) -> None:
    """Stop the cluster's redis-server, keep it down for `seconds`, start it on the same port."""
    cluster.redis_server.stop()
    time.sleep(seconds)  # the outage itself: what the workers must ride out
    cluster.redis_server.start()


def all_acknowledged(cluster: Cluster) -> None:
    """Every message delivered was acknowledged (a step acknowledges just after its result)."""
    wait_for(
        lambda: cluster.redis.hlen("unacked") == 0,
        timeout=30,
        what="every delivered message to be acknowledged",
    )


def round_trip(cluster: Cluster, timeout: float = 60) -> set[str]:
    """Ping every worker by sending real tasks through the broker; the nodes that answered."""
    answered: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(answered) < len(cluster.workers) and time.monotonic() < deadline:
        pings = [cluster.app.send_task("imgprep.ping", queue="imgprep") for _ in range(8)]
        for ping in pings:
            ping.get(timeout=timeout)
            meta = cluster.app.backend.get_task_meta(ping.id)
            answered.add(str(meta.get("worker")))
    return answered


def test_a_burst_of_prepares_survives_a_redis_outage(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given a cluster whose redis-server keeps its data (AOF), two workers, leases as in
    # production (30 s, so the download's lock outlives the outage), and an image served
    # slowly enough that Redis goes away in the middle of its download
    cluster = cluster_factory(
        "outage", {"IMGPREP_LOCK__LEASE_SECONDS": "30", "IMGPREP_LOCK__RENEW_SECONDS": "10"}
    )
    cluster.add_worker("o1")
    cluster.add_worker("o2")
    name = unique("outage") + ".raw"
    source = write_raw_image(image_server.root / name, size=64 * MiB, data=os.urandom(4 * MiB))
    image_server.bytes_per_second = 4 * MiB
    image_id = unique("img")

    # When a burst of ten prepares of it arrives, and Redis is stopped for 6 s while the
    # image downloads, then started again on the same port
    results: list[AsyncResult] = [
        cluster.client.prepare_disk(request_for(image_server.url(name), image_id))
        for _ in range(10)
    ]
    wait_for(lambda: image_server.gets(name), timeout=60, what="the download to start")
    stop_redis_for(cluster, OUTAGE_SECONDS)

    # Then every request ends in success, from one download, with the cache entry intact
    # one result at a time (they run at once on the workers): Celery's result consumer shares
    # one pubsub connection, which threads subscribing at once as it reconnects can hang
    prepared = [wait_through_outages(cluster, r.id, 300) for r in results]
    assert {p.base.path for p in prepared} == {
        str(cluster.settings.cache_dir / cache_key(image_id))
    }
    assert image_server.gets(name) == 1
    entry = Path(prepared[0].base.path)
    assert (
        hashlib.sha256(entry.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    )
    assert all(Path(p.disk.path).is_file() for p in prepared)
    # and both workers still consume: each answers a task sent after the restart; every
    # message was acknowledged (none waits for the visibility timeout)
    assert round_trip(cluster) == {w.nodename for w in cluster.workers}
    all_acknowledged(cluster)
    image_server.bytes_per_second = None
    cluster.assert_clean()


class BreakingSource:
    """An HTTP source whose first GET sends half the image, then hangs until `cut` is set and
    closes the connection; later GETs get the whole image."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gets = 0
        self.half_sent = threading.Event()
        self.cut = threading.Event()
        source = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                source.gets += 1
                first = source.gets == 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(source.data)))
                self.end_headers()
                if not first:
                    self.wfile.write(source.data)
                    return
                self.wfile.write(source.data[: len(source.data) // 2])
                self.wfile.flush()
                source.half_sent.set()
                source.cut.wait(120)
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/image.raw"


@pytest.fixture
def breaking_source() -> Iterator[BreakingSource]:
    source = BreakingSource(os.urandom(8 * MiB))
    source.thread.start()
    try:
        yield source
    finally:
        source.cut.set()
        source.server.shutdown()
        source.server.server_close()


def test_a_retry_due_while_redis_is_down_waits_for_it(
    cluster_factory: ClusterFactory, breaking_source: BreakingSource
) -> None:
    # Given a worker downloading an image whose source will break off
    cluster = cluster_factory("retry-outage")
    cluster.add_worker("ro")
    result = cluster.client.prepare_disk(request_for(breaking_source.url, unique("img")))
    assert breaking_source.half_sent.wait(60), "the download never started"

    # When Redis stops, and the source breaks off while Redis is down (so the step's retry
    # must be published while nothing can take it), and Redis comes back after 6 s
    cluster.redis_server.stop()
    breaking_source.cut.set()
    time.sleep(OUTAGE_SECONDS)  # the outage itself
    cluster.redis_server.start()

    # Then the retry was published once Redis was back, and the operation succeeded with it
    prepared = wait_through_outages(cluster, result.id, 120)
    assert Path(prepared.disk.path).is_file()
    assert breaking_source.gets == 2
    view = cluster.journal.read(result.id)
    assert view is not None
    fetch = next(r for r in view.records.values() if r.name == "imgprep.fetch_to_cache")
    assert (fetch.state, fetch.attempts) == ("SUCCESS", 2)
    all_acknowledged(cluster)
    cluster.assert_clean()


def test_a_retry_waiting_out_its_countdown_survives_a_redis_restart(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given a worker whose retries wait 10-20 s, and a source that answers 503 once
    cluster = cluster_factory(
        "countdown",
        {"IMGPREP_RETRY__BACKOFF_SECONDS": "20", "IMGPREP_RETRY__BACKOFF_MAX_SECONDS": "20"},
    )
    cluster.add_worker("cd")
    name = unique("countdown") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"countdown" * 100)
    image_server.fail_next(name, 503, times=1)
    result = cluster.client.prepare_disk(request_for(image_server.url(name), unique("img")))

    # When Redis restarts while the worker holds the retry's message, waiting for its countdown
    def retry_held() -> bool:
        view = cluster.journal.read(result.id)
        records = view.records.values() if view else []
        waiting = any(r.name == "imgprep.fetch_to_cache" and r.state == "RETRY" for r in records)
        return waiting and cluster.redis.hlen("unacked") == 1 and not cluster.redis.llen("imgprep")

    wait_for(retry_held, timeout=60, what="the worker to hold the retry during its countdown")
    stop_redis_for(cluster, OUTAGE_SECONDS)

    # Then the retry still runs (within its countdown and the restart, not after the hour the
    # visibility timeout would take), and the operation succeeds
    prepared = wait_through_outages(cluster, result.id, 90)
    assert Path(prepared.disk.path).is_file()
    assert image_server.gets(name) == 2
    all_acknowledged(cluster)
    cluster.assert_clean()
