"""A whole imgprep stack for a benchmark: its own redis-server (AOF on, as in production), real
`imgprep worker` processes with default settings, a local HTTP image server, and directories on
the disk (/var/tmp), all stopped by the pids we started."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery

from domain.cache.networks import loopback_allowed
from worker.app import create_app
from worker.client import Client
from worker.harness.image_server import ImageServer
from worker.harness.redis_server import RedisServer, free_port
from worker.harness.worker_processes import WorkerProcess, start_worker
from worker.settings import Settings

MiB = 2**20


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
    *, workers: int = 1, concurrency: int = 2, extra_env: dict[str, str] | None = None
) -> Iterator[Stack]:
    """Start a stack; everything it started is stopped when the block ends."""
    with tempfile.TemporaryDirectory(prefix="imgprep-bench-", dir="/var/tmp") as work:
        root = Path(work)
        # this host's settings may run the workers as imgprep (scripts/install.sh writes
        # /etc/imgprep/imgprep.toml): they must reach the stack's directories
        root.chmod(0o755)
        for sub in ("cache", "instances", "state", "served", "logs"):
            (root / sub).mkdir()
        redis_server = RedisServer(root / "redis", free_port(), appendonly=True).start()
        env = {
            **os.environ,
            "IMGPREP_REDIS_URL": redis_server.url,
            "IMGPREP_CACHE_DIR": str(root / "cache"),
            "IMGPREP_INSTANCES_DIR": str(root / "instances"),
            "IMGPREP_STATE_DIR": str(root / "state"),
            "IMGPREP_LOG_FORMAT": "json",
            "IMGPREP_LOG_LEVEL": "WARNING",
            # images are served on this host
            "IMGPREP_FETCH__DENIED_NETWORKS": json.dumps(loopback_allowed()),
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
