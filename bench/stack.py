"""A whole imgprep stack for a benchmark: its own redis-server (AOF on, as in production), real
`imgprep worker` processes with default settings, a local HTTP image server, and directories on
the disk (/var/tmp), all stopped by the pids we started."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery

from domain.cache.networks import loopback_allowed
from harness.privileges import privileged_overrides, socket_directory, unprivileged_user
from harness.redis_server import RedisServer
from worker.app.application import create_app
from worker.cli.client import Client
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port
from worker.cli.demo.worker_processes import WorkerProcess, start_worker
from worker.settings import Settings

MiB = 2**20
CONFIG = Path(__file__).resolve().parents[1] / "config" / "imgprep.toml"


@dataclass
class Stack:
    root: Path
    redis_server: RedisServer
    settings: Settings
    env: dict[str, str]
    app: Celery
    server: ImageServer
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def client(self) -> Client:
        return Client(self.app)

    def add_worker(self, concurrency: int) -> WorkerProcess:
        nodename = f"bench-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        worker = start_worker(
            nodename=nodename,
            log_path=self.root / "logs" / f"{nodename}.log",
            env=self.env,
            concurrency=concurrency,
        )
        self.workers.append(worker)
        worker.wait_ready(self.app, timeout=60)
        return worker


@contextmanager
def stack(
    *,
    workers: int = 1,
    concurrency: int = 2,
    extra_env: dict[str, str] | None = None,
    privsep: bool = False,
) -> Iterator[Stack]:
    """Start a stack; everything it started is stopped when the block ends. With `privsep` the
    workers run as the unprivileged user with a privileged helper each, as installed."""
    with contextlib.ExitStack() as cleanup:
        work = cleanup.enter_context(
            tempfile.TemporaryDirectory(prefix="imgprep-bench-", dir="/var/tmp")
        )
        yield cleanup.enter_context(_stack(Path(work), workers, concurrency, extra_env, privsep))


@contextmanager
def _stack(
    root: Path,
    workers: int,
    concurrency: int,
    extra_env: dict[str, str] | None,
    privsep: bool,
) -> Iterator[Stack]:
    separated: dict[str, str] = {}
    sockets: Path | None = None
    # the workers may run as the unprivileged user (privsep, or this host's
    # /etc/imgprep/imgprep.toml): they must reach the stack's directories
    root.chmod(0o755)
    if privsep:
        unprivileged_user()
        sockets = socket_directory()  # a Unix socket's path is short
        separated = privileged_overrides(root, sockets=sockets)
    try:
        for sub in ("cache", "instances", "state", "served", "logs"):
            (root / sub).mkdir()
        redis_server = RedisServer(root / "redis", free_port(), appendonly=True).start()
        env = {
            **os.environ,
            # the checkout's documented defaults, not this host's /etc/imgprep (which may
            # separate privileges): `privsep` decides
            "IMGPREP_CONFIG": str(CONFIG),
            "IMGPREP_REDIS_URL": redis_server.url,
            "IMGPREP_CACHE_DIR": str(root / "cache"),
            "IMGPREP_INSTANCES_DIR": str(root / "instances"),
            "IMGPREP_STATE_DIR": str(root / "state"),
            "IMGPREP_LOG_FORMAT": "json",
            "IMGPREP_LOG_LEVEL": "WARNING",
            # images are served on this host
            "IMGPREP_FETCH__DENIED_NETWORKS": json.dumps(loopback_allowed()),
            **separated,
            **(extra_env or {}),
        }
        settings = Settings(
            redis_url=redis_server.url,
            cache_dir=root / "cache",
            instances_dir=root / "instances",
            state_dir=root / "state",
        )
        server = ImageServer(root / "served").start()
        made = Stack(
            root=root,
            redis_server=redis_server,
            settings=settings,
            env=env,
            app=create_app(settings),
            server=server,
        )
        try:
            for _ in range(workers):
                made.add_worker(concurrency)
            yield made
        finally:
            for worker in made.workers:
                worker.stop(timeout=20)
            server.stop()
            redis_server.stop()
    finally:
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)


def write_image(path: Path, *, size: int, data_bytes: int) -> Path:
    """A sparse raw image of `size` bytes whose first `data_bytes` are random data."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        written = 0
        while written < data_bytes:
            block = os.urandom(min(4 * MiB, data_bytes - written))
            handle.write(block)
            written += len(block)
    return path
