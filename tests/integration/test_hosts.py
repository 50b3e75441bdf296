"""Every request ends, whatever host it names: a host without live workers is refused at once,
and work left for a host whose workers died is failed with a clear error by the live workers,
its pins on cached bases released."""

from __future__ import annotations

import os
import signal
import time

import pytest

from domain.core.errors import HostUnavailable
from domain.core.models import DiskSpec
from domain.disks.instance_disks import disk_lock_name
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, ClusterFactory, unique
from tests.support.waiting import wait_for
from worker.app.routing import host_queue
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.worker_processes import WorkerProcess
from worker.delivery.hosts import CLOCK_KEY, HOSTS_KEY, OUTAGES_KEY
from worker.delivery.liveness import Liveness
from worker.stores.redis_locks import LeaseLock
from worker.stores.replies import text

MiB = 2**20
# Short enough for a test, in the same proportions as the defaults (10 s, 30 s, 300 s).
FAST_HOSTS = {
    "IMGPREP_HOSTS__HEARTBEAT_SECONDS": "0.5",
    "IMGPREP_HOSTS__SILENT_AFTER_SECONDS": "3",
    "IMGPREP_HOSTS__ABANDON_AFTER_SECONDS": "6",
}


def prepare_payload(
    image_server: ImageServer, name: str, image_id: str, **extra: object
) -> dict[str, object]:
    return {
        "image": {"url": image_server.url(name), "image_id": image_id},
        "disk": {"instance_id": unique("vm"), "size_bytes": 64 * MiB},
        **extra,
    }


def pins(cluster: Cluster) -> list[str]:
    return [
        f"{text(key)} {text(holder)}"
        for key in cluster.redis.scan_iter(match="imgprep:refs:*")
        for holder in cluster.redis.hkeys(key)
        if text(holder).startswith("pending/")
    ]


def test_a_host_without_workers_is_refused_at_once(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given a cluster whose only worker is of this machine's host, and an image already cached
    cluster = cluster_factory("no-host")
    cluster.add_worker("here")
    name = unique("hosts") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"hosts" * 100)
    image_id = unique("img")
    own = cluster.settings.host_id
    first = cluster.client.send(
        "imgprep.prepare_disk", prepare_payload(image_server, name, image_id, host=own)
    )
    assert first.get(timeout=60)["disk"]["host"] == own  # its own host, named: accepted

    # When operations name a host no worker serves
    sent = {
        "prepare_disk": cluster.client.send(
            "imgprep.prepare_disk",
            prepare_payload(image_server, name, image_id, host="other-host"),
        ),
        "snapshot": cluster.client.send(
            "imgprep.snapshot",
            {"instance_id": "vm-x", "target": "x.qcow2", "host": "other-host"},
        ),
        "delete_disk": cluster.client.send(
            "imgprep.delete_disk", {"instance_id": "vm-x", "host": "other-host"}
        ),
    }

    # Then each fails at once with HostUnavailable naming the host, nothing waits in its queue,
    # and the cached base is not pinned for the refused prepare
    for operation, result in sent.items():
        with pytest.raises(HostUnavailable, match=r"other-host has ever announced") as refused:
            result.get(timeout=30)
        assert "refused" in str(refused.value), operation
    assert cluster.redis.llen(host_queue("other-host")) == 0
    assert pins(cluster) == []
    cluster.assert_clean()


def kill_and_wait_silent(cluster: Cluster, worker: WorkerProcess, host: str) -> float:
    """SIGKILL `worker` (its whole process group); when it was killed."""
    wait_for(
        lambda: cluster.redis.zscore(HOSTS_KEY, host) is not None,
        timeout=30,
        what=f"host {host} to announce itself",
    )
    worker.kill()
    return time.monotonic()


def test_work_queued_for_a_host_whose_worker_died_fails_and_releases_its_pins(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given two hosts, each with one worker, fast heartbeats, and an image already cached
    cluster = cluster_factory("dead-host", FAST_HOSTS)
    cluster.add_worker("a")
    host_b = unique("host-b")
    b = cluster.add_worker("b", env={"IMGPREP_HOST_ID": host_b})
    name = unique("hosts") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"hosts" * 100)
    image_id = unique("img")
    cluster.client.send("imgprep.prepare_disk", prepare_payload(image_server, name, image_id)).get(
        timeout=60
    )

    # When host B's only worker is killed, and a prepare for host B arrives right after (B was
    # heard from a moment ago, so it is accepted: its disk step waits in B's queue)
    killed = kill_and_wait_silent(cluster, b, host_b)
    result = cluster.client.send(
        "imgprep.prepare_disk", prepare_payload(image_server, name, image_id, host=host_b)
    )

    # Then within the abandon bound the request fails with HostUnavailable naming B and its
    # queue, B's queue is empty, and the canvas's pin on the base is released
    with pytest.raises(HostUnavailable, match=f"{host_b}.*{host_queue(host_b)} was abandoned"):
        result.get(timeout=60)
    assert time.monotonic() - killed < 6 + 10
    wait_for(
        lambda: cluster.redis.llen(host_queue(host_b)) == 0,
        timeout=10,
        what="the sweeper to remove the failed message from B's queue",
    )
    assert pins(cluster) == []

    # And a request for B now is refused at once
    late = cluster.client.send(
        "imgprep.prepare_disk", prepare_payload(image_server, name, image_id, host=host_b)
    )
    with pytest.raises(HostUnavailable, match="refused"):
        late.get(timeout=30)
    cluster.assert_clean()


def test_a_step_held_by_a_worker_that_died_is_failed_too(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given two hosts with fast heartbeats; steps wait 1 s for a lock, then retry 10-20 s later
    cluster = cluster_factory(
        "held",
        {
            **FAST_HOSTS,
            "IMGPREP_LOCK__WAIT_SECONDS": "1",
            "IMGPREP_RETRY__BACKOFF_SECONDS": "20",
            "IMGPREP_RETRY__BACKOFF_MAX_SECONDS": "20",
        },
    )
    cluster.add_worker("a")
    host_b = unique("host-b")
    b = cluster.add_worker("b", env={"IMGPREP_HOST_ID": host_b})
    name = unique("held") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"held" * 100)
    payload = prepare_payload(image_server, name, unique("img"), host=host_b)
    # and the instance's disk lock held elsewhere, so B's disk step retries after a countdown
    lock = LeaseLock(
        cluster.redis,
        disk_lock_name(DiskSpec.model_validate(payload["disk"])),
        lease=60,
        renew_every=10,
        wait=5,
    )
    lock.acquire()
    try:
        result = cluster.client.send("imgprep.prepare_disk", payload)

        def held_by_b() -> bool:
            view = cluster.journal.read(result.id)
            records = view.records.values() if view else []
            return any(r.state == "RETRY" and r.worker == b.nodename for r in records)

        wait_for(held_by_b, timeout=60, what="host B's worker to hold its step's retry")

        # When B's only worker dies holding that message (delivered, never acknowledged)
        kill_and_wait_silent(cluster, b, host_b)

        # Then the live worker fails the request with HostUnavailable and releases the pin
        with pytest.raises(HostUnavailable, match=f"{host_b}.*abandoned"):
            result.get(timeout=60)
        assert pins(cluster) == []
        wait_for(
            lambda: cluster.redis.hlen("unacked") == 0,
            timeout=30,
            what="no message to be left unacknowledged",
        )
    finally:
        lock.release()
    cluster.assert_clean()


def test_a_host_stays_live_while_its_worker_finishes_its_tasks_in_a_warm_shutdown(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given the only worker of a host, beating every 0.5 s (silent after 3 s), downloading an
    # image served slowly enough to take about 8 s
    cluster = cluster_factory("warm-stop")
    host = unique("warm-host")
    worker = cluster.add_worker("w", env={**FAST_HOSTS, "IMGPREP_HOST_ID": host})
    name = unique("warm") + ".raw"
    write_raw_image(image_server.root / name, size=16 * MiB, data=os.urandom(16 * MiB))
    image_server.bytes_per_second = 2 * MiB
    cluster.client.send(
        "imgprep.prepare_disk", prepare_payload(image_server, name, unique("img"), host=host)
    )
    wait_for(lambda: image_server.gets(name), timeout=30, what="the download to start")

    # When the worker is asked to stop (SIGTERM: a warm shutdown waits for the running task)
    os.kill(worker.pid, signal.SIGTERM)

    # Then for as long as it runs, its host is never silent long enough to be taken for dead
    # (its queue would be swept while the download went on, and the successor failed with
    # HostUnavailable)
    liveness = Liveness(HOSTS_KEY, CLOCK_KEY, OUTAGES_KEY)
    silences = []
    deadline = time.monotonic() + 90
    while worker.process.poll() is None and time.monotonic() < deadline:
        silences.append(liveness.silences(cluster.redis)[host])
        time.sleep(0.25)
    assert worker.process.poll() is not None, "the worker did not finish its warm shutdown"
    assert len(silences) > 8, "the worker stopped before its download could have ended"
    assert max(silences) < 3, f"the host was silent {max(silences):.1f} s while its worker ran"
