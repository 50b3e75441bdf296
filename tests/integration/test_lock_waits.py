"""Lock waiters wait as long as `lock.wait_seconds` allows, however long the holder takes, on
the Redis clients the project really makes (redis-py 8 gives every client a 5 s socket timeout
by default, which a blocking wait must not run into)."""

from __future__ import annotations

import os
import threading
import time

from domain.core.errors import CoordinationUnavailable
from harness.redis_server import RedisServer
from tests.conftest import write_raw_image
from tests.integration.conftest import ClusterFactory, unique
from tests.integration.test_reliability import attempts, request_for
from tests.support.waiting import wait_for
from worker.app.runtime import redis_client
from worker.cli.demo.image_server import ImageServer
from worker.stores.redis_locks import LeaseLock

MiB = 2**20


def test_a_waiter_outlasts_the_socket_timeout_of_its_client(redis_server: RedisServer) -> None:
    # Given a holder that keeps the lock for 9 s, on the client a worker makes, with a lease
    # (30 s) longer than any socket timeout, so one blocking wait would outlast it
    name = f"test:long-holder:{os.getpid()}"
    holder = LeaseLock(
        redis_client(redis_server.url), name, lease=30.0, renew_every=10.0, wait=60.0
    )
    holder.acquire()
    released = threading.Event()

    def release_later() -> None:
        time.sleep(9)  # the holder's work: this is what the waiter must outlast
        holder.release()
        released.set()

    # When a waiter asks for the lock meanwhile, with a wait of 60 s
    waiter = LeaseLock(
        redis_client(redis_server.url), name, lease=30.0, renew_every=10.0, wait=60.0
    )
    thread = threading.Thread(target=release_later)
    thread.start()
    started = time.monotonic()
    try:
        fence = waiter.acquire()
    except CoordinationUnavailable as error:  # what redis-py's 5 s read timeout gave
        thread.join()
        raise AssertionError(f"the waiter gave up on a healthy Redis: {error}") from None
    waited = time.monotonic() - started
    thread.join()

    # Then it got the lock right after the release, having waited the whole 9 s
    assert released.is_set()
    assert waited > 8.5
    assert fence > 0
    waiter.release()
    assert redis_server.client().get(waiter.key) is None


def test_waiting_steps_spend_no_retry_while_the_holder_downloads(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given two workers with production-like leases (30 s, renewed every 10 s) and an image
    # whose download takes about 10 s
    cluster = cluster_factory(
        "waiters", {"IMGPREP_LOCK__LEASE_SECONDS": "30", "IMGPREP_LOCK__RENEW_SECONDS": "10"}
    )
    cluster.add_worker("w1")
    cluster.add_worker("w2")
    name = unique("slow") + ".raw"
    write_raw_image(image_server.root / name, size=20 * MiB, data=os.urandom(MiB))
    image_server.bytes_per_second = 2 * MiB
    image_id = unique("img")

    # When three prepares of it arrive at once
    results = [
        cluster.client.prepare_disk(request_for(image_server.url(name), image_id)) for _ in range(3)
    ]
    wait_for(lambda: image_server.gets(name), timeout=60, what="the download to start")
    prepared = [cluster.client.wait_prepared(result, timeout=180) for result in results]

    # Then all succeed from one download, and no fetch step spent a retry waiting for the lock
    assert len({p.base.path for p in prepared}) == 1
    assert image_server.gets(name) == 1
    assert [attempts(cluster, result, "fetch_to_cache") for result in results] == [1, 1, 1]
    image_server.bytes_per_second = None
    cluster.assert_clean()
