"""An idle worker claims a step's successor as soon as it is published (worker/delivery/broker.py,
worker/delivery/broker_peeks.py), on real processes: a worker, its steps, Redis at its default hz.

Until the peeks, an idle worker watched one queue at a time with a peek of `peek_timeout`
(0.1 s) and claimed in between; a step's successor is published on the host's queue, the queue
just claimed from, which the rotation had put last: unless the step outlasted the peek on the
other queue, the successor waited for that peek to end, at least 0.1 s after it began (Redis
never ends a block early, and at hz 10 up to 0.1 s late): 75 to 200 ms a hop, whatever the
machine's load. The wait is measured in Redis's clock (MONITOR), from the successor's LPUSH to
the claim that takes it: it holds no step's work, only the worker's wake-up, which now takes a
round trip or two."""

from __future__ import annotations

import time

from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from harness.redis_monitor import CommandLog
from tests.integration.conftest import ClusterFactory, unique
from tests.integration.test_injection import KEY, serve_guest
from tests.support.guests import MiB
from worker.app.routing import host_queue
from worker.cli.demo.image_server import ImageServer


def test_an_idle_worker_claims_each_successor_within_milliseconds(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given an idle worker of its own, consuming the shared queue and its host's, and every
    # command its Redis runs followed (MONITOR)
    cluster = cluster_factory("claims")
    cluster.add_worker("idle")
    name, _ = serve_guest(image_server, "mbr")
    image_id = unique("img")
    commands = CommandLog(cluster.redis).start()

    # When prepares with a file to inject run one after the other (five steps on the host's
    # queue each), each after the pause of a control plane
    try:
        for _ in range(5):
            time.sleep(0.5)
            request = PrepareRequest(
                image=ImageSource(url=image_server.url(name), image_id=image_id),
                disk=DiskSpec(instance_id=unique("vm"), size_bytes=64 * MiB),
                inject=(KEY,),
            )
            cluster.client.wait_prepared(cluster.client.prepare_disk(request), timeout=120)
    finally:
        commands.stop()

    # Then the successors were claimed within milliseconds of being published: hardly any
    # waited 50 ms (it takes a stalled process; a worker that watched one queue at a time made
    # 7 to 16 of 25 wait 50 to 200 ms)
    waits = commands.waits((host_queue(cluster.settings.host_id),))
    assert len(waits) >= 20, waits
    slow = [round(wait * 1000, 1) for wait in waits if wait >= 0.05]
    assert len(slow) <= 2, f"{len(slow)} of {len(waits)} waited: {slow} ms"
    cluster.assert_clean()
