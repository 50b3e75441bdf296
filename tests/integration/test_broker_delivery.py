"""Delivery through the broker when a whole worker dies (worker/delivery/broker.py): a message never
leaves Redis unrecorded, and what a dead worker held goes back to its queue within seconds, not
after the visibility timeout (an hour by default)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import redis

from tests.conftest import write_raw_image
from tests.integration.conftest import ClusterFactory, unique
from tests.integration.test_redis_outage import stop_redis_for, wait_through_outages
from tests.integration.test_reliability import request_for
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer

MiB = 2**20


def blocked_clients(client: redis.Redis) -> list[dict[str, Any]]:
    """The connections blocked in a command (BRPOP, BLMOVE, ...): a worker waiting for work."""
    return [c for c in client.client_list() if "b" in str(c.get("flags", ""))]


def test_a_worker_killed_while_a_message_is_on_its_way_to_it_loses_nothing(
    cluster_factory: ClusterFactory,
) -> None:
    # Given one idle worker, blocked in Redis waiting for a message
    cluster = cluster_factory("in-transit")
    victim = cluster.add_worker("victim", concurrency=1)
    wait_for(lambda: blocked_clients(cluster.redis), timeout=30, what="the worker to wait")

    # When its main process stops (as a process does between reading a message and recording
    # it), a message arrives meanwhile, and the worker is killed before it runs again
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        ping = cluster.app.send_task("imgprep.ping", queue="imgprep")
    finally:
        victim.kill()

    # Then the message was not lost with it: the next worker runs it
    cluster.add_worker("rescuer")
    answer = ping.get(timeout=60)
    assert answer["pid"] != victim.pid
    cluster.assert_clean()


def test_the_messages_of_a_killed_worker_go_back_long_before_the_visibility_timeout(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given one worker (visibility timeout of an hour, as by default) downloading an image slowly
    cluster = cluster_factory("dead-consumer")
    assert cluster.settings.visibility_timeout >= 3600
    victim = cluster.add_worker("victim", concurrency=1)
    name = unique("held") + ".raw"
    write_raw_image(image_server.root / name, size=32 * MiB, data=os.urandom(16 * MiB))
    image_server.bytes_per_second = 1 * MiB
    try:
        result = cluster.client.prepare_disk(request_for(image_server.url(name), unique("img")))
        wait_for(lambda: image_server.gets(name), timeout=60, what="the download to start")

        # When the whole worker is killed while it holds the step's message (unacknowledged),
        # and another worker is running
        victim.kill()
        image_server.bytes_per_second = None
        cluster.add_worker("rescuer")

        # Then the message goes back to the queue within seconds and the request succeeds
        prepared = cluster.client.wait_prepared(result, timeout=120)
    finally:
        image_server.bytes_per_second = None
    assert Path(prepared.disk.path).is_file()
    assert image_server.gets(name) == 2
    wait_for(
        lambda: cluster.redis.hlen("unacked") == 0,
        timeout=30,
        what="every delivered message to be acknowledged",
    )
    cluster.assert_clean()


def test_a_killed_workers_messages_go_back_while_redis_restarts_every_few_seconds(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given one worker downloading an image slowly, on a Redis that keeps its data (AOF)
    cluster = cluster_factory("dead-consumer-restarts")
    victim = cluster.add_worker("victim", concurrency=1)
    name = unique("held") + ".raw"
    write_raw_image(image_server.root / name, size=32 * MiB, data=os.urandom(16 * MiB))
    image_server.bytes_per_second = 1 * MiB
    restarting = threading.Event()

    def restart_redis_every_few_seconds() -> None:
        while not restarting.wait(8):  # up 8 s, down 2 s: never up for 20 s in a row
            stop_redis_for(cluster, 2)

    restarts = threading.Thread(target=restart_redis_every_few_seconds, daemon=True)
    try:
        result = cluster.client.prepare_disk(request_for(image_server.url(name), unique("img")))
        wait_for(lambda: image_server.gets(name), timeout=60, what="the download to start")

        # When the whole worker is killed while it holds the step's message, another worker
        # runs, and Redis restarts every 10 s from then on
        victim.kill()
        image_server.bytes_per_second = None
        cluster.add_worker("rescuer")
        restarts.start()

        # Then the message still goes back (after 20 s of Redis's uptime, outages left out)
        prepared = wait_through_outages(cluster, result.id, 120)
    finally:
        restarting.set()
        if restarts.is_alive():
            restarts.join(timeout=30)
        image_server.bytes_per_second = None
    assert Path(prepared.disk.path).is_file()
    wait_for(
        lambda: cluster.redis.hlen("unacked") == 0,
        timeout=30,
        what="every delivered message to be acknowledged",
    )
    cluster.assert_clean()
