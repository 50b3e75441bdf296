"""Fixtures of the rbd backend's tests: one throwaway Ceph cluster per test session (cephx on,
as production runs it) and an imgprep cluster whose workers use it, on two host ids. Tests use
their own image and instance ids in the shared pools; tests that kill Ceph daemons start their
own cluster (`ceph_factory`). Imported by the test modules that need them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.redis_server import RedisServer
from tests.integration.conftest import Cluster, make_cluster, unique
from worker.cli.demo.ceph_cluster import CephCluster
from worker.cli.demo.ports import free_port
from worker.cli.demo.worker_processes import stop_workers

RBD_HOSTS = ("rbd-a", "rbd-b")


def rbd_leftovers(ceph: CephCluster, pools: tuple[str, ...] = ("vms", "images")) -> list[str]:
    """Temporaries in the pools: images under `<name>.part.<fence>`."""
    return [f"{pool}/{name}" for pool in pools for name in ceph.images(pool) if ".part." in name]


def assert_rbd_clean(cluster: Cluster, ceph: CephCluster) -> None:
    cluster.assert_clean()
    assert rbd_leftovers(ceph) == []
    assert list(cluster.redis.scan_iter(match="imgprep:temporaries:*")) == []


@pytest.fixture(scope="session")
def ceph(session_root: Path) -> Iterator[CephCluster]:
    """The session's Ceph cluster: a monitor and a memstore OSD, cephx on, pools vms and images."""
    directory = session_root / "ceph"
    directory.mkdir(mode=0o755)
    with contextlib.closing(_Stopper(CephCluster(directory, cephx=True).start())) as started:
        yield started.cluster


class _Stopper:
    def __init__(self, cluster: CephCluster) -> None:
        self.cluster = cluster

    def close(self) -> None:
        self.cluster.stop()


@pytest.fixture(scope="session")
def rbd_cluster(session_root: Path, ceph: CephCluster) -> Iterator[Cluster]:
    """Two workers (hosts rbd-a and rbd-b) on the session's Ceph, with a redis-server of their
    own: on the session's, they would take the other tests' requests from the shared queue."""
    root = session_root / "rbd"
    server = RedisServer(root / "redis", free_port()).start()
    try:
        made = make_cluster(root, server, ceph.env())
        try:
            made.add_workers(*((host, {"IMGPREP_HOST_ID": host}) for host in RBD_HOSTS))
            yield made
        finally:
            stop_workers(made.workers)
    finally:
        server.stop()


@pytest.fixture
def clean_rbd(rbd_cluster: Cluster, ceph: CephCluster) -> Iterator[Cluster]:
    """The session's rbd cluster, checked for leftovers (in Ceph too) after the test."""
    yield rbd_cluster
    assert_rbd_clean(rbd_cluster, ceph)


@pytest.fixture
def ceph_factory(tmp_path: Path) -> Iterator[Callable[..., CephCluster]]:
    """Private Ceph clusters, for tests that kill or stop daemons; stopped by their pids."""
    started: list[CephCluster] = []

    def start(**options: object) -> CephCluster:
        directory = tmp_path / unique("ceph")
        directory.mkdir(mode=0o755)
        cluster = CephCluster(directory, **options)  # type: ignore[arg-type]
        started.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in started:
            cluster.stop()
