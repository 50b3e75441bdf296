"""The processes of a campaign: `imgprep worker`s in slots, each slot on a host id with that
host's instances, state and snapshots directories, all hosts sharing one cache directory and one
redis-server. A slot's worker can be killed and started again (a new node name, as a rebooted
host's worker would have); everything is stopped by the pids we started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from bench.chaos.sources import DENIED_ADDRESS
from domain.cache.networks import loopback_allowed
from harness.privileges import privileged_overrides, socket_directory, unprivileged_user
from harness.redis_server import RedisServer
from harness.sentinel import SentinelRedis
from harness.settings import settings_for_env
from worker.cli.demo.worker_processes import WorkerProcess, start_worker, stop_workers
from worker.stores.redis_locks import LOCK_PREFIX
from worker.stores.replies import text

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Tuning:
    """Settings that make faults matter within a short run, and stay valid (worker/settings.py).

    The lease is above redis-py's default 5 s socket timeout on purpose: waiters then block on
    the lock's wake-up list for longer than that, as they do with production leases."""

    lease_seconds: float = 6.0
    renew_seconds: float = 2.0
    lock_wait_seconds: float = 30.0
    # README's rule: a step's time limit is above the longest fetch (the 24 s source) plus
    # lock.wait_seconds; with less, a waiter that gets the lock late times out without a fault
    step_time_limit: int = 75
    visibility_timeout: int = 80
    max_retries: int = 4
    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 4.0
    read_timeout_seconds: float = 5.0
    connect_timeout_seconds: float = 3.0
    # a download slower than this over the window ends (SourceTooSlow); the slowest source sends
    # 512 KiB/s, a trickling one a byte a second
    min_bytes_per_second: int = 64 * 2**10
    rate_window_seconds: float = 8.0

    def env(self) -> dict[str, str]:
        return {
            "IMGPREP_LOCK__LEASE_SECONDS": str(self.lease_seconds),
            "IMGPREP_LOCK__RENEW_SECONDS": str(self.renew_seconds),
            "IMGPREP_LOCK__WAIT_SECONDS": str(self.lock_wait_seconds),
            "IMGPREP_STEP_TIME_LIMIT": str(self.step_time_limit),
            "IMGPREP_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "IMGPREP_RETRY__MAX_RETRIES": str(self.max_retries),
            "IMGPREP_RETRY__BACKOFF_SECONDS": str(self.backoff_seconds),
            "IMGPREP_RETRY__BACKOFF_MAX_SECONDS": str(self.backoff_max_seconds),
            "IMGPREP_FETCH__READ_TIMEOUT_SECONDS": str(self.read_timeout_seconds),
            "IMGPREP_FETCH__CONNECT_TIMEOUT_SECONDS": str(self.connect_timeout_seconds),
            "IMGPREP_FETCH__MIN_BYTES_PER_SECOND": str(self.min_bytes_per_second),
            "IMGPREP_FETCH__RATE_WINDOW_SECONDS": str(self.rate_window_seconds),
        }


@dataclass(frozen=True)
class Host:
    """One host id and its own directories."""

    id: str
    instances_dir: Path
    state_dir: Path
    snapshots_dir: Path


@dataclass
class Slot:
    """A place for one worker on a host; `worker` is None while it is down."""

    name: str
    host: Host
    worker: WorkerProcess | None = None
    generation: int = 0


@dataclass
class Cluster:
    root: Path
    redis_server: RedisServer | SentinelRedis
    cache_dir: Path
    hosts: list[Host]
    slots: list[Slot]
    base_env: dict[str, str]
    concurrency: int
    control: Celery  # a plain app on the broker, for control pings
    stopped: list[WorkerProcess] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    # privilege separation: each worker starts its own helper and runs as the workers' user
    privsep: bool = False
    helper_killed: set[str] = field(default_factory=set)  # slots whose worker will stop
    sockets: Path | None = None  # a short directory for the helpers' sockets (108-byte limit)

    # -- starting and stopping -------------------------------------------------------------

    def host_env(self, host: Host) -> dict[str, str]:
        return {
            **self.base_env,
            "IMGPREP_HOST_ID": host.id,
            "IMGPREP_INSTANCES_DIR": str(host.instances_dir),
            "IMGPREP_STATE_DIR": str(host.state_dir),
            "IMGPREP_SNAPSHOTS_DIR": str(host.snapshots_dir),
        }

    def start(self, slot: Slot) -> WorkerProcess:
        """Start the slot's worker (a new node name each life) without waiting for it."""
        slot.generation += 1
        nodename = f"chaos-{slot.name}-g{slot.generation}@{socket.gethostname()}"
        env = self.host_env(slot.host)
        if self.privsep:  # a socket per worker, the loop ledger per host
            run = self.root / "run"
            sockets = self.sockets or run
            env.update(privileged_overrides(run, sockets=sockets))
            socket_name = f"{slot.name}-g{slot.generation}.sock"
            env["IMGPREP_PRIVILEGES__HELPER_SOCKET"] = str(sockets / socket_name)
            env["IMGPREP_PRIVILEGES__HELPER_STATE_DIR"] = str(run / f"{slot.host.id}-helper")
        slot.worker = start_worker(
            nodename=nodename,
            log_path=self.root / "logs" / f"{slot.name}-g{slot.generation}.log",
            env=env,
            concurrency=self.concurrency,
        )
        return slot.worker

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Every slot's worker answers a control ping through the broker (a worker that died
        on its own meanwhile is started again, and counted in `unexpected_exits`)."""
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            while slot.worker is not None:
                try:
                    slot.worker.wait_ready(
                        self.control, timeout=max(1.0, deadline - time.monotonic())
                    )
                    break
                except TimeoutError:
                    raise
                except Exception:  # exited (RuntimeError), or the broker is restarting
                    if time.monotonic() > deadline:
                        raise
                    self.replace_exited("while waiting for workers")
                    time.sleep(0.5)

    def replace_exited(self, when: str) -> None:
        """Start again every worker that exited although nobody killed it; such an exit is a
        finding, kept in `unexpected_exits`."""
        for slot in self.live_slots():
            assert slot.worker is not None
            code = slot.worker.process.poll()
            if code is not None and slot.name in self.helper_killed:
                self.helper_killed.discard(slot.name)  # it stops when its helper dies
                self.stopped.append(slot.worker)
                slot.worker = None
                self.start(slot)
            elif code is not None:
                self.unexpected_exits.append(
                    f"worker {slot.worker.nodename} exited on its own with status {code} "
                    f"({when}); see {slot.worker.log_path}"
                )
                self.stopped.append(slot.worker)
                slot.worker = None
                self.start(slot)

    def kill(self, slot: Slot) -> WorkerProcess | None:
        """SIGKILL the slot's worker and its pool (the process group of the pid we started)."""
        victim = slot.worker
        if victim is None:
            return None
        victim.kill()
        slot.worker = None
        self.stopped.append(victim)
        return victim

    def stop_all(self) -> None:
        live = [slot.worker for slot in self.slots if slot.worker is not None]
        for worker in live:
            self.continue_all(worker)
        stop_workers(live, timeout=30)  # side by side
        for slot in self.slots:
            slot.worker = None
        self.stopped.extend(live)
        for worker in self.stopped:
            worker.kill()  # a group of a killed worker may still hold stray children
        if self.sockets is not None:  # the sockets of killed helpers stay behind
            shutil.rmtree(self.sockets, ignore_errors=True)

    @staticmethod
    def continue_all(worker: WorkerProcess) -> None:
        """SIGCONT the worker and its pool, so that a paused process can shut down warmly."""
        for pid in (worker.pid, *worker.pool_pids()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    # -- looking at it -------------------------------------------------------------------------

    def live_slots(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.worker is not None]

    def pool_pids(self) -> list[tuple[Slot, int]]:
        return [
            (slot, pid)
            for slot in self.live_slots()
            if slot.worker is not None
            for pid in sorted(slot.worker.pool_pids())
        ]

    def slot_of(self, pid: int) -> Slot | None:
        for slot in self.live_slots():
            assert slot.worker is not None
            if pid in slot.worker.pool_pids():  # never the main process: it holds no step
                return slot
        return None

    def lock_holders(self, client: redis.Redis) -> list[tuple[str, int, Slot]]:
        """(lock name, pid, slot) of every lease lock held by a process of ours; tokens are
        `host:pid:uuid` (worker/locks.py)."""
        holders = []
        for raw_key in sorted(client.scan_iter(match=LOCK_PREFIX + "*")):
            token = client.get(raw_key)
            if not token:
                continue
            parts = text(token, "replace").split(":")
            if len(parts) < 3 or not parts[-2].isdigit():
                continue
            pid = int(parts[-2])
            slot = self.slot_of(pid)
            if slot is not None:
                holders.append((text(raw_key, "replace").removeprefix(LOCK_PREFIX), pid, slot))
        return holders


def make_cluster(
    root: Path,
    redis_server: RedisServer | SentinelRedis,
    *,
    hosts: int,
    workers: int,
    concurrency: int,
    tuning: Tuning,
    privsep: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Cluster:
    """Describe the cluster (directories made, settings validated); no worker started yet.
    With `privsep`, workers run as the unprivileged user with a helper each; `extra_env`: more
    settings of every worker (a Ceph cluster's, with --rbd)."""
    cache_dir = root / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    made_hosts = []
    for number in range(hosts):
        base = root / "hosts" / f"h{number}"
        host = Host(f"h{number}", base / "instances", base / "state", base / "snapshots")
        for directory in (host.instances_dir, host.state_dir, host.snapshots_dir):
            directory.mkdir(parents=True, exist_ok=True)
        made_hosts.append(host)
    base_env = {
        **os.environ,
        "IMGPREP_CONFIG": str(REPO / "config" / "imgprep.toml"),
        **redis_server.env(),
        "IMGPREP_CACHE_DIR": str(cache_dir),
        "IMGPREP_LOG_FORMAT": "json",
        "IMGPREP_LOG_LEVEL": "INFO",
        "IMGPREP_METRICS__ENABLED": "false",
        # an eviction request may pass a size cap: let it take any unused entry
        "IMGPREP_IMAGE_CACHE__MIN_IDLE_SECONDS": "0",
        **tuning.env(),
        **(extra_env or {}),
    }
    # the image server is on loopback, which the default deny list refuses (issue 11, #13):
    # allow loopback but for the denied address, where requests that must fail point
    base_env["IMGPREP_FETCH__DENIED_NETWORKS"] = json.dumps(
        loopback_allowed((f"{DENIED_ADDRESS}/32",))
    )
    control = Celery("chaos-control", broker=redis_server.url, set_as_current=False)
    control.conf.update(
        accept_content=["json"],
        task_serializer="json",
        broker_transport_options=redis_server.transport_options(),
    )
    cluster = Cluster(
        root=root,
        redis_server=redis_server,
        cache_dir=cache_dir,
        hosts=made_hosts,
        slots=[Slot(f"w{n}", made_hosts[n % hosts]) for n in range(workers)],
        base_env=base_env,
        concurrency=concurrency,
        control=control,
        privsep=privsep,
    )
    if privsep:
        unprivileged_user()
        root.chmod(0o755)  # the workers' user reaches its directories below
    for host in made_hosts:
        settings_for_env(cluster.host_env(host))  # an invalid combination fails here
    if privsep:  # removed by stop_all
        cluster.sockets = socket_directory()
    return cluster
