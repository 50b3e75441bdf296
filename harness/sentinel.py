"""A replicated Redis of our own: a master, two replicas and three Sentinels on free loopback
ports, with failover settings fast enough for tests (a master silent for `down_after_ms` is
replaced within a few seconds), for the tests, the benchmarks and the fault campaign.

Every process is started, and stopped, by the pid we started (never by name). Sentinels announce
127.0.0.1 and the replicas announce it too, so nothing ever points off this machine.
`kill_master` is a host dying: SIGKILL of the current master, then waiting until the Sentinels
have promoted a replica, and the killed server comes back as a replica of the new master (only
then: a master that came back empty before the failover would be taken as the master again).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from harness.redis_server import RedisServer
from worker.cli.demo.ports import free_port
from worker.settings import RedisSettings
from worker.stores.redis_connect import redis_client

MASTER_NAME = "imgprep"
LOOPBACK = "127.0.0.1"


@dataclass
class SentinelProcess:
    """One redis-sentinel (`redis-server <conf> --sentinel`) we started."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=LOOPBACK, port=self.port, socket_timeout=5, socket_connect_timeout=2
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


@dataclass
class SentinelRedis:
    """Three redis-servers (one master, two replicas) watched by three Sentinels."""

    directory: Path
    down_after_ms: int = 1500
    failover_timeout_ms: int = 4000
    servers: list[RedisServer] = field(default_factory=list)
    sentinels: list[SentinelProcess] = field(default_factory=list)
    failovers: int = 0

    # -- what clients use ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The Sentinel URL of this Redis, as IMGPREP_REDIS_URL takes it."""
        return ";".join(f"sentinel://{LOOPBACK}:{s.port}" for s in self.sentinels) + "/0"

    @property
    def master_name(self) -> str:
        return MASTER_NAME

    @property
    def settings(self) -> RedisSettings:
        return RedisSettings(master_name=MASTER_NAME)

    def env(self) -> dict[str, str]:
        """The settings a worker needs to use it."""
        return {"IMGPREP_REDIS_URL": self.url, "IMGPREP_REDIS__MASTER_NAME": MASTER_NAME}

    def transport_options(self) -> dict[str, object]:
        """What a plain Celery app needs beside the URL: the master's name."""
        return {"master_name": MASTER_NAME}

    @property
    def running(self) -> bool:
        """Whether the Sentinels agree on a master."""
        return self.master_port() is not None

    def client(self) -> redis.Redis:
        """A client of whichever server is the master (asks the Sentinels on each connect)."""
        return redis_client(self.url, self.settings, socket_timeout=10)

    # -- starting and stopping ----------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SentinelRedis:
        """Start the master, its replicas, the Sentinels; return once every Sentinel sees the
        master with both replicas and the other Sentinels."""
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run scripts/install.sh")
        try:
            master = self._start_server("r0", ())
            for name in ("r1", "r2"):
                self._start_server(name, ("--replicaof", LOOPBACK, str(master.port)))
            for name in ("s0", "s1", "s2"):
                self._start_sentinel(name, master.port)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_server(self, name: str, replica_of: tuple[str, ...]) -> RedisServer:
        for attempt in range(3):
            server = RedisServer(
                self.directory / name,
                free_port(),
                extra_args=("--replica-announce-ip", LOOPBACK, *replica_of),
            )
            try:
                server.start(30.0)
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            self.servers.append(server)
            return server
        raise AssertionError("unreachable")

    def _start_sentinel(self, name: str, master_port: int) -> SentinelProcess:
        directory = self.directory / name
        directory.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        assert binary is not None
        for attempt in range(3):
            sentinel = SentinelProcess(directory, free_port())
            config = directory / "sentinel.conf"  # Sentinel rewrites it: a file of its own
            config.write_text(
                "\n".join(
                    [
                        f"port {sentinel.port}",
                        f"bind {LOOPBACK}",
                        "daemonize no",
                        f"dir {directory}",
                        f"logfile {directory / 'sentinel.log'}",
                        f"sentinel announce-ip {LOOPBACK}",
                        f"sentinel monitor {MASTER_NAME} {LOOPBACK} {master_port} 2",
                        f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                        f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
                        f"sentinel parallel-syncs {MASTER_NAME} 2",
                        "",
                    ]
                )
            )
            sentinel.process = subprocess.Popen(
                [binary, str(config), "--sentinel"], stdin=subprocess.DEVNULL
            )
            if self._answers(sentinel, 20.0):
                self.sentinels.append(sentinel)
                return sentinel
            sentinel.stop()
            if attempt == 2:
                raise RuntimeError(f"redis-sentinel on port {sentinel.port} did not answer")
        raise AssertionError("unreachable")

    @staticmethod
    def _answers(sentinel: SentinelProcess, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        probe = sentinel.client()
        try:
            while time.monotonic() < deadline:
                if sentinel.process is None or sentinel.process.poll() is not None:
                    return False
                with contextlib.suppress(redis.RedisError):
                    if probe.ping():
                        return True
                time.sleep(0.05)
        finally:
            probe.close()
        return False

    def stop(self) -> None:
        """Stop every Sentinel and server we started, by pid."""
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()

    # -- watching -------------------------------------------------------------------------------

    def master_port(self) -> int | None:
        """The master's port as a majority of Sentinels report it (None: no agreement)."""
        seen: dict[int, int] = {}
        for sentinel in self.sentinels:
            probe = sentinel.client()
            try:
                address: Any = probe.sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            finally:
                probe.close()
            if address:
                seen[int(address[1])] = seen.get(int(address[1]), 0) + 1
        agreed = [port for port, votes in seen.items() if votes >= 2]
        return agreed[0] if agreed else None

    def master(self) -> RedisServer:
        port = self.master_port()
        for server in self.servers:
            if server.port == port:
                return server
        raise RuntimeError(f"the Sentinels agree on no master of ours (port {port})")

    def _healthy(self) -> bool:
        """The Sentinels agree on a live master that has two replicas in sync, and every
        Sentinel knows both replicas and the two other Sentinels."""
        port = self.master_port()
        try:
            return (
                port is not None
                and _replicas_online(port)
                and all(_sees_everything(sentinel) for sentinel in self.sentinels)
            )
        except (redis.RedisError, KeyError, TypeError, ValueError):
            return False

    def ready_for_failover(self) -> bool:
        """Whether a failover could happen now (see `_healthy`)."""
        return self._healthy()

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Wait until a failover could happen again: see `_healthy`."""
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Sentinel cluster in {self.directory} did not become healthy within "
                    f"{timeout:.0f} s (master port {self.master_port()})"
                )
            time.sleep(0.1)

    # -- the fault -------------------------------------------------------------------------------

    def kill_master(self, timeout: float = 60.0, *, wait_healthy: bool = True) -> RedisServer:
        """SIGKILL the master; return the new master once the Sentinels agree on it. The killed
        server then starts again on its port as a replica of the new master (with
        `wait_healthy`, also wait until it is in sync and the Sentinels know it)."""
        old = self.master()
        old.kill()
        deadline = time.monotonic() + timeout
        while True:
            port = self.master_port()
            if port is not None and port != old.port and self._is_master(port):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no failover within {timeout:.0f} s of killing the master")
            time.sleep(0.05)
        self.failovers += 1
        old.extra_args = ("--replica-announce-ip", LOOPBACK, "--replicaof", LOOPBACK, str(port))
        old.start(30.0)
        if wait_healthy:
            self.wait_healthy(max(1.0, deadline - time.monotonic()) + 30)
        return self.master()

    @staticmethod
    def _is_master(port: int) -> bool:
        try:
            with contextlib.closing(redis.Redis(host=LOOPBACK, port=port, socket_timeout=5)) as c:
                return c.info("replication").get("role") == "master"
        except redis.RedisError:
            return False


def _replicas_online(port: int) -> bool:
    with contextlib.closing(redis.Redis(host=LOOPBACK, port=port, socket_timeout=5)) as client:
        info = client.info("replication")
    return (
        info.get("role") == "master"
        and int(info.get("connected_slaves", 0)) >= 2
        and all(info[f"slave{i}"].get("state") == "online" for i in range(2))
    )


def _sees_everything(sentinel: SentinelProcess) -> bool:
    with contextlib.closing(sentinel.client()) as probe:
        state: Any = probe.sentinel_master(MASTER_NAME)
        replicas: Any = probe.sentinel_slaves(MASTER_NAME)
    down = ("s_down", "o_down")
    return (
        int(state["num-other-sentinels"]) >= 2
        and int(state["num-slaves"]) >= 2
        and not any(flag in state["flags"] for flag in down)
        and not any(flag in r["flags"] for r in replicas for flag in down)
    )
