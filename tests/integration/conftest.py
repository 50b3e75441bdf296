"""Real parts for integration tests: a redis-server of our own, real `imgprep worker`
processes, a local HTTP image server, real directories for cache, instances and state.

Every cluster's workers start their privileged helper (a socket each) and run as the
unprivileged user `imgprep`, in directories that user can reach, as scripts/install.sh sets up a
host; with IMGPREP_TEST_PRIVSEP=0 they run as root and do their privileged work themselves.

The session's redis-server and two workers are shared; tests use their own image ids and
instance ids, and each ends by checking that the machine is clean. Tests that kill workers or
restart Redis start their own.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from domain.cache.networks import loopback_allowed
from harness.machine import leftovers
from harness.privileges import (
    open_directory,
    privileged_overrides,
    socket_directory,
    unprivileged_user,
)
from harness.redis_server import RedisServer
from harness.settings import settings_for_env
from tests.support.cli import run_imgprep
from tests.support.parallel import LONGEST_FIRST, SERIAL
from worker.app.application import create_app
from worker.cli.client import Client
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port
from worker.cli.demo.worker_processes import WorkerProcess, start_worker, stop_workers
from worker.settings import Settings
from worker.stores.redis_journal import RedisJournal


@dataclass
class Cluster:
    """The real parts a test talks to."""

    redis_server: RedisServer
    env: dict[str, str]
    settings: Settings
    app: Celery
    workers: list[WorkerProcess]
    root: Path
    # Separated, each worker started by start_worker starts a helper on a socket of its own
    # (one socket serves one worker); other processes (the CLI, the demo) use the cluster's.
    socket_per_worker: bool = False
    sockets: Path | None = None  # a short directory for the helpers' sockets (helper_sockets)

    @property
    def client(self) -> Client:
        return Client(self.app)

    @property
    def redis(self) -> redis.Redis:
        return self.redis_server.client()

    @property
    def journal(self) -> RedisJournal:
        return RedisJournal(self.redis, 3600)

    def leftovers(self) -> dict[str, list[object]]:
        return leftovers(
            client=self.redis,
            cache_dir=self.settings.cache_dir,
            instances_dir=self.settings.instances_dir,
            state_dir=self.settings.state_dir,
            devices_dir=self.settings.devices_dir,
        )

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """`imgprep ARGS` run as a user would, in this cluster's environment."""
        return run_imgprep(self.env, *args, timeout=timeout)

    def give_to_workers(self, *paths: Path) -> None:
        """Files and directories a test made as root, given to the workers' user as the
        workers would have made them (separated; as root, nothing to do). The FUSE daemons run
        as that user and open only what it can."""
        user = self.settings.privileges.user
        if not user:
            return
        owner = pwd.getpwnam(user)
        for path in paths:
            os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)

    def assert_clean(self, settle_seconds: float = 5.0) -> None:
        """Nothing is left behind. A lock a live worker holds for a moment (a periodic sweep
        of silent hosts, say) is not a leak: leftovers are read again for `settle_seconds`,
        and only what is still there then fails the test."""
        deadline = time.monotonic() + settle_seconds
        while True:
            found = {kind: items for kind, items in self.leftovers().items() if items}
            if not found or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not found, f"left behind: {found}"

    def add_worker(self, name: str, **options: object) -> WorkerProcess:
        """Start a worker and keep it in `workers`, so the cluster stops it."""
        worker = self.start_worker(name, **options)  # type: ignore[arg-type]
        self.workers.append(worker)
        return worker

    def add_workers(self, *named: tuple[str, dict[str, str]]) -> list[WorkerProcess]:
        """Start workers (name, env) side by side, each kept in `workers`; return once every
        one is ready."""
        started = []
        for name, env in named:
            started.append(self.launch_worker(name, env=env))
            self.workers.append(started[-1])
        for worker in started:
            worker.wait_ready(self.app, timeout=60)
        return started

    def start_worker(
        self,
        name: str,
        *,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> WorkerProcess:
        worker = self.launch_worker(name, concurrency=concurrency, env=env, extra_args=extra_args)
        worker.wait_ready(self.app, timeout=60)
        return worker

    def launch_worker(
        self,
        name: str,
        *,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> WorkerProcess:
        """Start a worker process without waiting for it to be ready."""
        nodename = f"{name}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        own = {}
        if self.socket_per_worker:
            sockets = self.sockets or self.root / "run"
            own["IMGPREP_PRIVILEGES__HELPER_SOCKET"] = str(
                sockets / f"{nodename.split('@', maxsplit=1)[0]}.sock"
            )
        return start_worker(
            nodename=nodename,
            log_path=self.root / "logs" / f"{nodename}.log",
            env={**self.env, **own, **(env or {})},
            concurrency=concurrency,
            extra_args=extra_args,
        )


# Separated unless IMGPREP_TEST_PRIVSEP=0 (then workers run as root and do everything in process)
PRIVSEP = os.environ.get("IMGPREP_TEST_PRIVSEP", "1") != "0"

# Images are served on 127.0.0.1; 127.0.0.2 stands for an address images may not come from
# (a test never sends anything off this machine, not even to see it refused).
DENIED_ADDRESS = "127.0.0.2"


def cluster_env(root: Path, redis_url: str) -> dict[str, str]:
    """The environment of every process in a test cluster."""
    return {
        **os.environ,
        "IMGPREP_CONFIG": str(Path(__file__).resolve().parents[2] / "config" / "imgprep.toml"),
        "IMGPREP_REDIS_URL": redis_url,
        "IMGPREP_CACHE_DIR": str(root / "cache"),
        "IMGPREP_INSTANCES_DIR": str(root / "instances"),
        "IMGPREP_STATE_DIR": str(root / "state"),
        "IMGPREP_SNAPSHOTS_DIR": str(root / "snapshots"),
        "IMGPREP_LOG_FORMAT": "json",
        "IMGPREP_FETCH__ALLOWED_SCHEMES": '["http", "https", "file"]',
        "IMGPREP_FETCH__FILE_ROOTS": f'["{root / "sources"}"]',
        "IMGPREP_FETCH__READ_TIMEOUT_SECONDS": "10",
        "IMGPREP_FETCH__DENIED_NETWORKS": json.dumps(loopback_allowed((f"{DENIED_ADDRESS}/32",))),
        "IMGPREP_RETRY__BACKOFF_SECONDS": "0.2",
        "IMGPREP_RETRY__BACKOFF_MAX_SECONDS": "1",
        "IMGPREP_RETRY__MAX_RETRIES": "4",
        "IMGPREP_LOCK__LEASE_SECONDS": "6",
        "IMGPREP_LOCK__RENEW_SECONDS": "2",
        # Several workers share this machine: tests that scrape metrics give a worker a port.
        "IMGPREP_METRICS__ENABLED": "false",
    }


@pytest.fixture(scope="session", autouse=True)
def _reachable_temporaries() -> Iterator[None]:
    """Separated, the workers' user must reach the directories tests give their clusters
    (`tmp_path`, `tmp_path_factory.mktemp`). pytest makes them under /tmp/pytest-of-root, which
    every pytest session started as root on this machine makes 0700 again when it starts; so
    here they are made 0755 (search and read, nothing more) in a directory of this session's
    own, removed at its end."""
    if not PRIVSEP:
        yield
        return
    unprivileged_user()
    original = pytest.TempPathFactory.mktemp
    with open_directory("tmp") as own:

        def mktemp(self: pytest.TempPathFactory, basename: str, numbered: bool = True) -> Path:
            if numbered:
                made = Path(tempfile.mkdtemp(prefix=f"{basename}-", dir=own))
            else:
                made = own / basename
                made.mkdir()
            made.chmod(0o755)
            return made

        pytest.TempPathFactory.mktemp = mktemp  # type: ignore[method-assign]
        try:
            yield
        finally:
            pytest.TempPathFactory.mktemp = original  # type: ignore[method-assign]


@functools.cache
def helper_sockets() -> Path:
    """This session's short directory for helper sockets, each cluster's in a directory of its
    own below (pytest's directories are too deep for a Unix socket's 108 bytes); removed at
    the session's end by _helper_sockets_removed."""
    return socket_directory()


@pytest.fixture(scope="session", autouse=True)
def _helper_sockets_removed() -> Iterator[None]:
    yield
    if helper_sockets.cache_info().currsize:
        shutil.rmtree(helper_sockets(), ignore_errors=True)


@pytest.fixture(scope="session")
def session_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with contextlib.ExitStack() as stack:
        if PRIVSEP:
            unprivileged_user()
            root = stack.enter_context(open_directory("session"))
        else:
            root = tmp_path_factory.mktemp("imgprep")
        for sub in ("cache", "instances", "state", "snapshots", "sources", "served", "logs"):
            (root / sub).mkdir()
        yield root


@pytest.fixture(scope="session")
def redis_server(session_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(session_root / "redis", free_port()).start()
    yield server
    server.stop()


def make_cluster(
    root: Path, redis_server: RedisServer, overrides: dict[str, str] | None = None
) -> Cluster:
    """A cluster description (no workers yet) whose processes share `root` and `redis_server`."""
    for sub in ("cache", "instances", "state", "sources", "logs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sockets = socket_directory(helper_sockets(), prefix="c") if PRIVSEP else None
    separated = privileged_overrides(root, sockets=sockets) if PRIVSEP else {}
    env = {**cluster_env(root, redis_server.url), **separated, **(overrides or {})}
    own_socket = "IMGPREP_PRIVILEGES__HELPER_SOCKET" not in (overrides or {})
    settings = settings_for_env(env)
    return Cluster(
        redis_server=redis_server,
        env=env,
        settings=settings,
        app=create_app(settings),
        workers=[],
        root=root,
        socket_per_worker=PRIVSEP and own_socket,
        sockets=sockets,
    )


@pytest.fixture(scope="session")
def cluster(session_root: Path, redis_server: RedisServer) -> Iterator[Cluster]:
    """Two real worker processes (concurrency 2 each) on the session's Redis."""
    result = make_cluster(session_root, redis_server)
    try:
        result.add_workers(("alpha", {}), ("beta", {}))
        yield result
    finally:
        stop_workers(result.workers)


class ClusterFactory:
    """Private clusters for tests that kill workers, restart Redis or fill disks: each has its own
    redis-server, directories and workers, all stopped by the pids we started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clusters: list[Cluster] = []

    def __call__(self, name: str, overrides: dict[str, str] | None = None) -> Cluster:
        root = self.root / unique(name)
        server = RedisServer(root / "redis", free_port()).start()
        try:
            made = make_cluster(root, server, overrides)
        except BaseException:  # settings that do not validate: no cluster will stop its Redis
            server.stop()
            raise
        self.clusters.append(made)
        return made

    def stop_all(self) -> None:
        # Results a test waited on unsubscribe from their Redis when collected; collect the
        # ones caught in reference cycles (a raised error's traceback) while Redis still runs,
        # or Celery raises "Retry limit exceeded" from AsyncResult.__del__ in a later test.
        gc.collect()
        stop_workers([worker for made in self.clusters for worker in made.workers], timeout=20)
        for made in self.clusters:
            made.redis_server.stop()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[ClusterFactory]:
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(open_directory("cluster")) if PRIVSEP else tmp_path
        factory = ClusterFactory(root)
        try:
            yield factory
        finally:
            factory.stop_all()


@pytest.fixture(scope="session")
def image_server(session_root: Path) -> Iterator[ImageServer]:
    with ImageServer(session_root / "served") as server:
        yield server


@pytest.fixture
def clean_cluster(cluster: Cluster, image_server: ImageServer) -> Iterator[Cluster]:
    """The session cluster, checked for leftovers after the test."""
    image_server.bytes_per_second = None
    yield cluster
    cluster.assert_clean()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The order and the serial tests of a parallel run (tests/support/parallel.py)."""
    here = Path(__file__).parent
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}

    def order(item: pytest.Item) -> int:
        if item.path.parent != here:
            return len(rank) + 1
        return rank.get(item.path.name, len(rank))

    for item in items:
        if item.path.parent == here and item.path.name in SERIAL:
            item.add_marker(pytest.mark.serial)
    items.sort(key=order)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# The rbd backend's fixtures (a session Ceph cluster, its imgprep cluster): defined beside their
# harness, made visible to every integration test here.
from tests.integration.ceph import ceph, ceph_factory, clean_rbd, rbd_cluster  # noqa: E402, F401
