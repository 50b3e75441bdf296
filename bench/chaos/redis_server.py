"""The campaign's redis-server: AOF on (as production runs it), its own port and directory, and
stopped and started again on the same port with the same append-only file by the nemesis.

(tests/support/redis_server.py does the same for the tests; bench/ does not import tests/.)
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisProcess:
    """A redis-server we started; `stop()` ends it by the pid we started."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=5
        )

    def start(self, timeout: float = 30.0) -> RedisProcess:
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
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
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


def start_redis(directory: Path, attempts: int = 3) -> RedisProcess:
    """A redis-server on a free port; another port if one was taken meanwhile."""
    for attempt in range(attempts):
        try:
            return RedisProcess(directory, free_port()).start()
        except RuntimeError:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")
