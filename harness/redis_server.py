"""A redis-server of our own on a free port, for the tests, the benchmarks and the fault campaign:
AOF on by default (as production runs it), ended by the pid that started it, and started again
on the same port with the same data (`restart`, or `stop` then `start`)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from worker.cli.demo.ports import free_port


@dataclass
class RedisServer:
    """A redis-server process we started."""

    directory: Path
    port: int
    appendonly: bool = True
    process: subprocess.Popen[bytes] | None = None
    socket_timeout: float | None = None  # of the clients `client()` makes
    extra_args: tuple[str, ...] = ()  # more redis-server options (a replica's `--replicaof`)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def env(self) -> dict[str, str]:
        """The settings a worker needs to use it."""
        return {"IMGPREP_REDIS_URL": self.url}

    def transport_options(self) -> dict[str, object]:
        """What a plain Celery app needs beside the URL (nothing, for one server)."""
        return {}

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=2,
            socket_timeout=self.socket_timeout,
        )

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start it and wait until it answers; a server that does not is stopped again."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/install.sh")
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            self._wait_answering(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_answering(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        probe = self.client()
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.RedisError):
                    if probe.ping():
                        return
                if self.process.poll() is not None:
                    log = self.directory / "redis.log"
                    tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                    raise RuntimeError(f"redis-server on port {self.port} exited: {tail}")
                time.sleep(0.02)
        finally:
            probe.close()
        raise RuntimeError(f"redis-server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: the AOF is flushed), SIGKILL if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a host that dies: nothing is flushed, nobody is told."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_redis(
    directory: Path, *, attempts: int = 3, socket_timeout: float | None = None
) -> RedisServer:
    """A redis-server on a free port; another port if one was taken meanwhile."""
    for attempt in range(attempts):
        try:
            return RedisServer(directory, free_port(), socket_timeout=socket_timeout).start(30.0)
        except RuntimeError:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")
