"""Redis with Sentinel: workers on a Sentinel URL ride out the master's death (SIGKILL, a host
gone), follow the new master, and keep every promise: every request ends in success, the cache
entry is whole, nothing stays locked or referenced, and two lock holders after a failover that
forgot the lock cannot publish two files or a partial one.

Real processes throughout: three redis-servers (a master and two replicas), three Sentinels
(`harness.sentinel`), real `imgprep worker` processes.
"""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from domain.cache.directory import cache_key
from domain.core.errors import LockBusy, LockLost
from domain.core.models import PreparedDisk
from domain.core.publish import Staged, publish_once, stale_temporaries
from harness.sentinel import SentinelRedis
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, make_cluster, unique
from tests.integration.test_reliability import attempts, request_for
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer
from worker.stores.redis_locks import FENCE_KEY, LOCK_PREFIX, LeaseLock

MiB = 2**20


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[SentinelRedis]:
    """A master, two replicas and three Sentinels of our own, stopped by their pids."""
    sentinel_redis = SentinelRedis(tmp_path / "ha").start()
    try:
        yield sentinel_redis
    finally:
        sentinel_redis.stop()


@pytest.fixture
def ha_cluster(tmp_path: Path, ha: SentinelRedis) -> Iterator[Cluster]:
    """Workers' settings on the Sentinel URL (no workers yet; the test adds them), separated
    as every test cluster is (conftest)."""
    overrides = {
        **ha.env(),
        # production leases: a lock outlives a failover (a few seconds) and is renewed on the
        # new master
        "IMGPREP_LOCK__LEASE_SECONDS": "30",
        "IMGPREP_LOCK__RENEW_SECONDS": "10",
    }
    # url, client(), stop(): all a Cluster uses of its Redis
    cluster = make_cluster(tmp_path / "cluster", ha, overrides)  # type: ignore[arg-type]
    try:
        yield cluster
    finally:
        # results waited on unsubscribe when collected: while Redis still runs (conftest)
        gc.collect()
        for worker in cluster.workers:
            worker.stop(timeout=10)


def wait_through_failovers(cluster: Cluster, task_id: str, timeout: float) -> PreparedDisk:
    """The operation's result, read as a control plane would: again after a lost connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return cluster.client.wait_prepared(cluster.app.AsyncResult(task_id), timeout=10)
        except Exception:  # the client's own connection to the old master
            if time.monotonic() > deadline:
                raise


def round_trip(cluster: Cluster, timeout: float = 90) -> set[str]:
    """Ping every worker through the broker; the nodes that answered."""
    answered: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(answered) < len(cluster.workers) and time.monotonic() < deadline:
        pings = [cluster.app.send_task("imgprep.ping", queue="imgprep") for _ in range(8)]
        for ping in pings:
            ping.get(timeout=timeout)
            answered.add(str(cluster.app.backend.get_task_meta(ping.id).get("worker")))
    return answered


def sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def test_a_burst_of_prepares_survives_two_failovers(
    ha: SentinelRedis, ha_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given two workers on the Sentinel URL and an image that takes seconds to download
    cluster = ha_cluster
    cluster.add_worker("s1")
    cluster.add_worker("s2")
    name = unique("failover") + ".raw"
    source = write_raw_image(image_server.root / name, size=48 * MiB, data=os.urandom(4 * MiB))
    image_server.bytes_per_second = 3 * MiB
    image_id = unique("img")

    # When a burst of ten prepares arrives and the master is SIGKILLed in the middle of it,
    results: list[AsyncResult] = [
        cluster.client.prepare_disk(request_for(image_server.url(name), image_id))
        for _ in range(10)
    ]
    ha.kill_master()
    # and again while the image downloads
    wait_for(lambda: image_server.gets(name), timeout=120, what="the download to start")
    ha.kill_master()
    assert ha.failovers == 2

    # Then every request ends in success, on one cache entry equal to its source
    try:
        # one result at a time (they run at once on the workers): Celery's result consumer
        # shares one pubsub connection, and threads that subscribed on it at once as it
        # reconnected to the new master waited forever for replies another thread had read
        prepared = [wait_through_failovers(cluster, r.id, 300) for r in results]
    finally:
        image_server.bytes_per_second = None
    assert {p.base.path for p in prepared} == {
        str(cluster.settings.cache_dir / cache_key(image_id))
    }
    assert sha256(Path(prepared[0].base.path)) == sha256(source)
    assert all(Path(p.disk.path).is_file() for p in prepared)
    # each failover can cost at most one more download (a lock forgotten by the new master)
    downloads = image_server.gets(name)
    print(f"downloads of the image over 2 failovers: {downloads}")
    assert 1 <= downloads <= 3
    # and both workers consume from the new master: each answers a task sent after it
    assert round_trip(cluster) == {w.nodename for w in cluster.workers}
    client = cluster.redis
    wait_for(
        lambda: client.hlen("unacked") == 0,
        timeout=90,
        what="every delivered message to be acknowledged on the new master",
    )
    cluster.assert_clean()


def forget_on_replicas(ha: SentinelRedis, keys: dict[str, bytes | str | None]) -> None:
    """Make both replicas lack what the master wrote last, as if it never reached them (the
    master then dies before replicating it): set each key to its value before (None: absent)."""
    master = ha.master().port
    for server in ha.servers:
        if server.port == master or not server.running:
            continue
        replica = server.client()
        try:
            replica.config_set("replica-read-only", "no")
            for key, value in keys.items():
                if value is None:
                    replica.delete(key)
                else:
                    replica.set(key, value)
            replica.config_set("replica-read-only", "yes")
        finally:
            replica.close()


def test_two_holders_after_a_failover_that_forgot_the_lock_publish_one_whole_file(
    ha: SentinelRedis, tmp_path: Path
) -> None:
    # Given a holder A of a cache lock, halfway through writing its temporary,
    target = tmp_path / "entry"
    name = "cache:" + unique("entry")
    data_a, data_b = os.urandom(2 * MiB), os.urandom(2 * MiB)
    client_a, client_b = ha.client(), ha.client()
    fence_before = client_a.get(FENCE_KEY)
    lock_a = LeaseLock(client_a, name, lease=30, renew_every=10, wait=5, replica_ack=1)
    halfway, go_on = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def stage_a(part: Path) -> Staged[str]:
        with part.open("wb") as out:
            out.write(data_a[:MiB])
            out.flush()
            halfway.set()
            assert go_on.wait(120)
            out.write(data_a[MiB:])
        return Staged(file=part, result="a")

    def run_a() -> None:
        try:
            outcome["a"] = publish_once(target, find=lambda: None, lease=lock_a, stage=stage_a)
        except Exception as error:
            outcome["a"] = error

    holder_a = threading.Thread(target=run_a)
    holder_a.start()
    assert halfway.wait(60)
    fence_a = lock_a.fence
    # when the master dies before its replicas got the lock (nor the fence's increment)
    forget_on_replicas(ha, {LOCK_PREFIX + name: None, FENCE_KEY: fence_before})
    ha.kill_master()

    # Then holder B takes the lock on the new master, with a fence of its own,
    lock_b = LeaseLock(client_b, name, lease=30, renew_every=10, wait=30, replica_ack=1)

    def stage_b(part: Path) -> Staged[str]:
        outcome["fence_b"] = lock_b.fence
        part.write_bytes(data_b)
        return Staged(file=part, result="b")

    try:
        assert publish_once(target, find=lambda: None, lease=lock_b, stage=stage_b) == "b"
        # (its temporaries are named by a fence that is not A's: they are B's own)
        assert isinstance(outcome["fence_b"], int) and outcome["fence_b"] > fence_a
    finally:
        # and A, finishing its copy, cannot publish it: its fence check on the new master fails
        go_on.set()
        holder_a.join(60)
    assert isinstance(outcome["a"], LockLost), outcome
    assert target.read_bytes() == data_b  # one whole file: B's
    assert stale_temporaries(target) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("entry")) == ["entry"]
    assert client_b.get(LOCK_PREFIX + name) is None
    client_a.close()
    client_b.close()


def test_a_fence_is_never_handed_out_twice_across_a_failover(ha: SentinelRedis) -> None:
    # Given a lock taken on the master, whose fence increment the replicas never got
    client = ha.client()
    before = client.get(FENCE_KEY)
    first = LeaseLock(client, unique("lock"), lease=30, renew_every=10, wait=5)
    fence = first.acquire()
    forget_on_replicas(ha, {LOCK_PREFIX + first.name: None, FENCE_KEY: before})

    # When the master dies and a replica takes over
    ha.kill_master()

    # Then the next lock's fence is larger: temporaries named by fences stay each holder's own
    second = LeaseLock(client, unique("lock"), lease=30, renew_every=10, wait=30)
    assert second.acquire() > fence
    second.release()
    assert first.release() is False  # the new master never knew it
    client.close()


def test_an_acknowledgement_the_failover_lost_runs_the_step_again_with_the_same_result(
    ha: SentinelRedis, ha_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a worker on the Sentinel URL preparing a disk from an image that takes seconds,
    cluster = ha_cluster
    cluster.add_worker("a1")
    name = unique("acked") + ".raw"
    write_raw_image(image_server.root / name, size=16 * MiB, data=os.urandom(2 * MiB))
    image_server.bytes_per_second = 4 * MiB
    try:
        result = cluster.client.prepare_disk(request_for(image_server.url(name), unique("img")))
        wait_for(lambda: image_server.gets(name), timeout=60, what="the download to start")
        # and the record of its fetch step's message as Redis holds it while the step runs
        master = cluster.redis
        index: Any = master.zrange("unacked_index", 0, -1, withscores=True)
        held: dict[str, Any] = {
            "unacked": master.hgetall("unacked"),
            "unacked_owner": master.hgetall("unacked_owner"),
            "unacked_index": dict(index),
        }
        assert held["unacked"] and held["unacked_owner"]
        first = cluster.client.wait_prepared(result, timeout=120)
    finally:
        image_server.bytes_per_second = None
    fetches = attempts(cluster, result, "fetch_to_cache")
    wait_for(lambda: master.hlen("unacked") == 0, timeout=60, what="every step acknowledged")
    master.execute_command("WAIT", 2, 10000)  # type: ignore[no-untyped-call]

    # When the master dies after acknowledging, before its replicas got the acknowledgement
    for server in ha.servers:
        if server.port == ha.master().port or not server.running:
            continue
        replica = server.client()
        try:
            replica.config_set("replica-read-only", "no")
            replica.hset("unacked", mapping=held["unacked"])
            replica.hset("unacked_owner", mapping=held["unacked_owner"])
            replica.zadd("unacked_index", held["unacked_index"])
            replica.config_set("replica-read-only", "yes")
        finally:
            replica.close()
    ha.kill_master()

    # Then the worker, reconnected to the new master, puts the message back and runs the step
    # again; it finds its artifact, the operation's result is the same, nothing downloads again
    wait_for(
        lambda: attempts(cluster, result, "fetch_to_cache") > fetches,
        timeout=120,
        what="the step whose acknowledgement was lost to run again",
    )
    client = cluster.redis
    wait_for(lambda: client.hlen("unacked") == 0, timeout=120, what="it to be acknowledged")
    again = wait_through_failovers(cluster, result.id, 120)
    assert again == first
    assert image_server.gets(name) == 1
    assert round_trip(cluster) == {w.nodename for w in cluster.workers}
    cluster.assert_clean()


def test_a_lock_a_replica_confirmed_outlives_a_failover(ha: SentinelRedis) -> None:
    # Given a lock taken on the master and confirmed by a replica (WAIT 1), renewed every 3 s
    client = ha.client()
    lock = LeaseLock(client, unique("lock"), lease=10, renew_every=3, wait=5, replica_ack=1)
    lock.acquire()
    try:
        # When the master dies and a replica takes over
        ha.kill_master()

        # Then the lock is still its holder's on the new master: its renewal reached the new
        # master within the lease, and the fence check before publishing passes
        wait_for(
            lambda: client.pttl(lock.key) > 10_000 - 3_500,
            timeout=30,
            what="the lease to be renewed on the new master",
        )
        assert not lock.lost
        lock.ensure_held()
        other = LeaseLock(ha.client(), lock.name, lease=10, renew_every=3, wait=0.5)
        with pytest.raises(LockBusy):
            other.acquire()
    finally:
        assert lock.release() is True
        client.close()
