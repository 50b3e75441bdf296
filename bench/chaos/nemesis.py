"""The nemesis: every few seconds one fault, drawn from the seed, healed after its duration.

Faults (each cycle of six takes every kind once, in an order drawn from the seed, so a short run
injects every kind):

* kill_pool: SIGKILL of one pool process, preferably one holding a lease lock (Celery's main
  process starts a new one);
* kill_worker: SIGKILL of a whole worker, main process and pool; started again (a new node name)
  after a few seconds;
* pause_holder: SIGSTOP of the process whose pid is in a held lock's token (`host:pid:uuid`),
  mostly of a cache lock, for 1.5 to 3 leases, then SIGCONT;
* redis_restart: redis-server stopped, down for 2 to 6 s, started on the same port with the same
  append-only file;
* stall_source: a source (preferably one being downloaded) stops sending mid-body for 3 to 12 s,
  which may be longer than the workers' read timeout;
* trickle_source: a source (preferably one being downloaded) sends one byte a second for 4 to
  20 s: no read timeout ends that, only the workers' minimum transfer rate (issue 11, #5);
* kill_helper (with --privsep only): SIGKILL of a worker's privileged helper, preferably while
  one of its operations runs; the worker then stops itself and is started again (with a new
  helper, whose janitor releases what the killed operations held).
* kill_osd, kill_mon (campaigns with `--rbd` only): SIGKILL of the Ceph cluster's OSD (its
  objects on a bluestore file survive) or monitor, started again after 2 to 8 s; requests wait
  for it (an rbd call blocks until the OSD is back) or retry (`CephUnavailable`);
* failover (campaigns on Sentinel only, `--sentinel`): SIGKILL of the Redis master; the fault
  lasts until the Sentinels have promoted a replica, then the killed server starts again as a
  replica of the new master. A failover waits until the previous one has healed (both replicas
  in sync, every Sentinel sees them), so that a replica is there to take over.

The schedule (kinds, gaps, durations, which victim by rank) comes from the seed; the victims
themselves depend on what runs at that moment. Faults overlap: a pause may still last while the
next fault starts. A fault that finds no victim (no lock held) waits for one a few seconds, then
is skipped and counted as such.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.chaos.catalogue import SourceImage
from bench.chaos.cluster import Cluster, Slot
from bench.chaos.history import Fault, History
from bench.chaos.sources import SourceServer
from bench.chaos.workload import pick
from harness.sentinel import SentinelRedis
from worker.cli.demo.ceph_cluster import CephCluster

KINDS = (
    "kill_pool",
    "kill_worker",
    "pause_holder",
    "redis_restart",
    "stall_source",
    "trickle_source",
)
PRIVSEP_KINDS = (*KINDS, "kill_helper")
# faults that need Redis behind Sentinel (bench.chaos --sentinel)
SENTINEL_KINDS = ("failover",)
# faults that need the campaign's Ceph cluster (bench.chaos --rbd)
RBD_KINDS = ("kill_osd", "kill_mon")
RETRY_EVERY = 0.5
GIVE_UP_AFTER = 10  # tries (5 s) to find a victim before a fault is skipped


@dataclass(frozen=True)
class NemesisOptions:
    min_gap: float = 2.0
    max_gap: float = 6.0
    kinds: tuple[str, ...] = KINDS


@dataclass(frozen=True)
class Planned:
    kind: str
    gap: float  # seconds after the previous fault started
    duration: float
    draws: tuple[float, float]


class Schedule:
    """The seed's sequence of planned faults."""

    def __init__(self, seed: int, options: NemesisOptions, lease: float) -> None:
        self.rng = random.Random(f"nemesis-{seed}")
        self.options = options
        self.lease = lease
        self._cycle: list[str] = []

    def next(self) -> Planned:
        if not self._cycle:
            self._cycle = list(self.options.kinds)
            self.rng.shuffle(self._cycle)
        kind = self._cycle.pop()
        gap = self.rng.uniform(self.options.min_gap, self.options.max_gap)
        spread = self.rng.random()
        duration = {
            "kill_pool": 0.0,
            "kill_worker": 1.0 + 4.0 * spread,
            "pause_holder": self.lease * (1.5 + 1.5 * spread),
            "redis_restart": 2.0 + 4.0 * spread,
            "stall_source": 3.0 + 9.0 * spread,
            "trickle_source": 4.0 + 16.0 * spread,
            "kill_helper": 0.0,
            "failover": 0.0,  # as long as the Sentinels take
            "kill_osd": 2.0 + 6.0 * spread,
            "kill_mon": 2.0 + 6.0 * spread,
        }[kind]
        return Planned(kind, gap, duration, (self.rng.random(), self.rng.random()))


@dataclass
class _Heal:
    due: float
    fault: Fault
    action: Callable[[], dict[str, object]]


@dataclass
class Nemesis:
    seed: int
    cluster: Cluster
    server: SourceServer
    catalogue: list[SourceImage]
    history: History
    options: NemesisOptions
    lease: float
    ceph: CephCluster | None = None  # with --rbd: kill_osd, kill_mon
    skipped: int = 0
    _heals: list[_Heal] = field(default_factory=list)
    _paused: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def start(self) -> Nemesis:
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop injecting and heal everything now: SIGCONT, Redis up, workers started."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for heal in sorted(self._heals, key=lambda h: h.due):
            self._apply(heal)
        self._heals.clear()

    @property
    def error(self) -> BaseException | None:
        """What ended the nemesis's thread early, if anything did."""
        return self._error

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        plan = Schedule(self.seed, self.options, self.lease)
        redis_client = self.cluster.redis_server.client()
        try:
            planned = plan.next() if self.options.kinds else Planned("none", 0.0, 0.0, (0.0, 0.0))
            due = time.monotonic() + planned.gap
            tries = 0
            while not self._stop.is_set():
                self._heal_due()
                self.cluster.replace_exited(f"t={self.history.now():.1f}s")
                if not self.options.kinds:  # a run without faults: the baseline
                    self._stop.wait(0.5)
                    continue
                now = time.monotonic()
                if now < due:
                    self._stop.wait(min(due - now, self._next_heal_in(), 0.5))
                    continue
                if self._inject(planned, redis_client):
                    tries = 0
                elif tries + 1 < GIVE_UP_AFTER:
                    tries += 1
                    due = now + RETRY_EVERY
                    continue
                else:
                    self.skipped += 1
                    tries = 0
                planned = plan.next()
                due = now + planned.gap
        except BaseException as error:  # the campaign reads it from `error`
            self._error = error
        finally:
            redis_client.close()

    def _next_heal_in(self) -> float:
        if not self._heals:
            return 0.5
        return max(0.0, min(h.due for h in self._heals) - time.monotonic())

    def _heal_due(self) -> None:
        now = time.monotonic()
        for heal in sorted([h for h in self._heals if h.due <= now], key=lambda h: h.due):
            self._heals.remove(heal)
            self._apply(heal)

    def _apply(self, heal: _Heal) -> None:
        detail = heal.action()
        self.history.end_fault(heal.fault, **detail)

    def _later(self, seconds: float, fault: Fault, action: Callable[[], dict[str, object]]) -> None:
        self._heals.append(_Heal(time.monotonic() + seconds, fault, action))

    # -- faults ----------------------------------------------------------------------------

    def _inject(self, planned: Planned, client: redis.Redis) -> bool:
        """Inject `planned`; False when it has no victim now (try again shortly)."""
        return {
            "kill_pool": self._kill_pool,
            "kill_worker": self._kill_worker,
            "pause_holder": self._pause_holder,
            "redis_restart": self._redis_restart,
            "stall_source": self._stall_source,
            "trickle_source": self._trickle_source,
            "kill_helper": self._kill_helper,
            "failover": self._failover,
            "kill_osd": self._kill_ceph_daemon,
            "kill_mon": self._kill_ceph_daemon,
        }[planned.kind](planned, client)

    def _holders(self, client: redis.Redis) -> list[tuple[str, int, Slot]]:
        if not self.cluster.redis_server.running:
            return []
        try:
            return [h for h in self.cluster.lock_holders(client) if h[1] not in self._paused]
        except redis.RedisError:
            return []

    def _kill_pool(self, planned: Planned, client: redis.Redis) -> bool:
        a, b = planned.draws
        holders = self._holders(client) if b < 0.7 else []
        if holders:
            lock, pid, slot = pick(holders, a)
        else:
            pools = self.cluster.pool_pids()
            if not pools:
                return False
            slot, pid = pick(pools, a)
            lock = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        assert slot.worker is not None
        fault = self.history.begin_fault(
            "kill_pool", f"{slot.worker.nodename} pid {pid}", pid=pid, lock=lock
        )
        self.history.end_fault(fault)
        return True

    def _kill_worker(self, planned: Planned, client: redis.Redis) -> bool:
        live = self.cluster.live_slots()
        if len(live) < 2:
            return False  # keep one worker of the cluster up
        slot = pick(live, planned.draws[0])
        victim = self.cluster.kill(slot)
        assert victim is not None
        fault = self.history.begin_fault(
            "kill_worker", victim.nodename, host=slot.host.id, pid=victim.pid
        )

        def restart() -> dict[str, object]:
            if slot.worker is None:
                started = self.cluster.start(slot)
                return {"restarted_as": started.nodename}
            return {}

        self._later(planned.duration, fault, restart)
        return True

    def _pause_holder(self, planned: Planned, client: redis.Redis) -> bool:
        holders = self._holders(client)
        if not holders:
            return False
        # mostly a cache lock (a download others wait for), sometimes a disk lock
        caches = [h for h in holders if h[0].startswith("cache:")]
        if caches and planned.draws[1] < 0.8:
            holders = caches
        lock, pid, slot = pick(holders, planned.draws[0])
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return False
        self._paused.add(pid)
        assert slot.worker is not None
        fault = self.history.begin_fault(
            "pause_holder",
            f"{slot.worker.nodename} pid {pid}",
            pid=pid,
            lock=lock,
            seconds=round(planned.duration, 1),
        )

        def resume() -> dict[str, object]:
            self._paused.discard(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            return {}

        self._later(planned.duration, fault, resume)
        return True

    def _redis_restart(self, planned: Planned, client: redis.Redis) -> bool:
        server = self.cluster.redis_server
        if isinstance(server, SentinelRedis) or not server.running:
            return False  # behind Sentinel, Redis goes away by `failover`
        server.stop()
        fault = self.history.begin_fault(
            "redis_restart", f"redis :{server.port}", down_seconds=round(planned.duration, 1)
        )

        def start() -> dict[str, object]:
            for attempt in range(5):  # same port, same AOF: wait if something holds the port
                if server.running:
                    break
                try:
                    server.start()
                except RuntimeError:
                    if attempt == 4:
                        raise
                    time.sleep(1.0)
            return {}

        self._later(planned.duration, fault, start)
        return True

    def _failover(self, planned: Planned, client: redis.Redis) -> bool:
        ha = self.cluster.redis_server
        if not isinstance(ha, SentinelRedis) or not ha.ready_for_failover():
            return False
        master = ha.master()
        fault = self.history.begin_fault("failover", f"redis master :{master.port}")
        promoted = ha.kill_master(wait_healthy=False)
        self.history.end_fault(fault, promoted=promoted.port, failovers=ha.failovers)
        return True

    def _stall_source(self, planned: Planned, client: redis.Redis) -> bool:
        a, _ = planned.draws
        active = sorted(self.server.active())
        name = pick(active, a) if active else pick([i.name for i in self.catalogue], a)
        self.server.stall(name, planned.duration)
        fault = self.history.begin_fault(
            "stall_source",
            name,
            seconds=round(planned.duration, 1),
            transfers=self.server.active().get(name, 0),
        )

        def unstall() -> dict[str, object]:
            self.server.unstall(name)
            return {}

        self._later(planned.duration, fault, unstall)
        return True

    def _trickle_source(self, planned: Planned, client: redis.Redis) -> bool:
        a, _ = planned.draws
        active = sorted(self.server.active())
        name = pick(active, a) if active else pick([i.name for i in self.catalogue], a)
        self.server.trickle(name, planned.duration)
        fault = self.history.begin_fault(
            "trickle_source",
            name,
            seconds=round(planned.duration, 1),
            transfers=self.server.active().get(name, 0),
        )

        def untrickle() -> dict[str, object]:
            self.server.untrickle(name)
            return {}

        self._later(planned.duration, fault, untrickle)
        return True

    def _kill_helper(self, planned: Planned, client: redis.Redis) -> bool:
        helpers = [
            (slot, pid)
            for slot in self.cluster.live_slots()
            if slot.worker is not None and slot.name not in self.cluster.helper_killed
            for pid in slot.worker.helper_pids()
        ]
        busy = [(slot, pid) for slot, pid in helpers if _has_children(pid)]
        if not helpers:
            return False
        slot, pid = pick(busy if busy and planned.draws[1] < 0.8 else helpers, planned.draws[0])
        self.cluster.helper_killed.add(slot.name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        assert slot.worker is not None
        fault = self.history.begin_fault(
            "kill_helper", f"{slot.worker.nodename} helper pid {pid}", pid=pid, busy=bool(busy)
        )
        self.history.end_fault(fault)
        return True

    def _kill_ceph_daemon(self, planned: Planned, client: redis.Redis) -> bool:
        ceph = self.ceph
        daemon = "osd.0" if planned.kind == "kill_osd" else "mon.a"
        if ceph is None or daemon not in ceph.processes:
            return False  # down already (a fault of the same kind still lasts)
        pid = ceph.processes[daemon].pid
        if planned.kind == "kill_osd":
            ceph.kill_osd()
        else:
            ceph.kill_monitor()
        fault = self.history.begin_fault(
            planned.kind, f"ceph {daemon} pid {pid}", down_seconds=round(planned.duration, 1)
        )

        def restart() -> dict[str, object]:
            if planned.kind == "kill_osd":
                ceph.start_osd()
            else:
                ceph.start_monitor()
            return {}

        self._later(planned.duration, fault, restart)
        return True


def _has_children(pid: int) -> bool:
    """Whether `pid` has a child: for a helper, an operation running."""
    try:
        return any(
            (task / "children").read_text().split() for task in Path(f"/proc/{pid}/task").iterdir()
        )
    except (FileNotFoundError, ProcessLookupError):
        return False
