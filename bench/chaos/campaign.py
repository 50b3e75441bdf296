"""One campaign, start to end: build the images, start Redis, the image server and the workers,
run the workload under the nemesis for the given duration, stop the nemesis (healing every
fault), let every request end, check the history and the final state, and stop everything we
started — also on Ctrl-C or an error — leaving no process, mount, loop device or directory.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import structlog

from bench.chaos.catalogue import SourceImage, build_catalogue
from bench.chaos.checker import Violation, World, check_history
from bench.chaos.client import PlainClient
from bench.chaos.cluster import Cluster, Tuning, make_cluster
from bench.chaos.final_state import check_final_state
from bench.chaos.history import History
from bench.chaos.nemesis import Nemesis, NemesisOptions
from bench.chaos.rbd_state import check_rbd_state
from bench.chaos.sources import DeniedListener, SourceServer
from bench.chaos.workload import Places, Workload, WorkloadOptions
from harness import machine
from harness.redis_server import RedisServer, start_redis
from harness.sentinel import SentinelRedis
from worker.cli.demo.ceph_cluster import CephCluster
from worker.stores.redis_locks import LOCK_PREFIX

TICK = 0.05
PROGRESS_EVERY = 15.0
SETTLE_TIMEOUT = 60.0
SHOWN_PER_INVARIANT = 5


@dataclass(frozen=True)
class Options:
    seed: int
    duration: float
    hosts: int = 2
    workers: int = 3
    concurrency: int = 2
    root: Path = Path("/var/tmp")
    keep: bool = False
    report: Path | None = None
    privsep: bool = False  # workers unprivileged, a helper each (kill_helper among the faults)
    tuning: Tuning = field(default_factory=Tuning)
    workload: WorkloadOptions = field(default_factory=WorkloadOptions)
    nemesis: NemesisOptions = field(default_factory=NemesisOptions)
    # Redis with a master, two replicas and three Sentinels (harness.sentinel): the
    # workers and the client on the Sentinel URL, and the `failover` fault possible
    sentinel: bool = False
    # a one-node Ceph cluster (bluestore on a file, cephx on) the workers' rbd disks live in,
    # a share of the prepares on it, and the kill_osd and kill_mon faults possible
    rbd: bool = False


@dataclass
class Summary:
    seed: int
    operations: int
    faults: int
    ended: int
    lost: int
    violations: list[Violation]
    faults_by_kind: dict[str, int]
    skipped_faults: int
    outcomes: dict[str, int]
    seconds: float
    late: int = 0  # ended, after their deadline
    longest: float = 0.0  # seconds of the longest request that ended
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.lost == 0 and not self.violations

    def line(self) -> str:
        return (
            f"chaos: seed={self.seed} operations={self.operations} faults={self.faults} "
            f"ended={self.ended} lost={self.lost} violations={len(self.violations)}"
        )

    def text(self) -> str:
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.faults_by_kind.items())) or "none"
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())) or "none"
        lines = [
            f"run: {self.seconds:.0f} s",
            f"faults by kind: {kinds} (skipped for want of a victim: {self.skipped_faults})",
            f"outcomes: {outcomes}",
            f"ended late (after their deadline, within its allowance): {self.late}; "
            f"longest request: {self.longest:.0f} s",
            *self.notes,
        ]
        by_invariant: dict[str, list[Violation]] = {}
        for violation in self.violations:
            by_invariant.setdefault(violation.invariant, []).append(violation)
        lines.append(f"violations: {len(self.violations)}")
        for invariant, found in sorted(by_invariant.items()):
            lines.append(f"  {invariant}: {len(found)}")
            lines += [f"    - {v.text}" for v in found[:SHOWN_PER_INVARIANT]]
            if len(found) > SHOWN_PER_INVARIANT:
                lines.append(f"    - … {len(found) - SHOWN_PER_INVARIANT} more in the report")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "operations": self.operations,
            "faults": self.faults,
            "ended": self.ended,
            "lost": self.lost,
            "violations": [v.__dict__ for v in self.violations],
            "faults_by_kind": self.faults_by_kind,
            "skipped_faults": self.skipped_faults,
            "outcomes": self.outcomes,
            "seconds": round(self.seconds, 1),
            "late": self.late,
            "longest": round(self.longest, 1),
            "notes": self.notes,
        }


def run_campaign(options: Options, say: Callable[[str], None] = print) -> Summary:
    """Run one campaign; everything it starts is stopped before it returns or raises."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings up
    campaign = Campaign(options, say)
    try:
        campaign.start()
        campaign.run()
        campaign.summary = campaign.check()
        return campaign.summary
    finally:
        campaign.stop()


class Campaign:
    """The parts of one campaign, started and stopped in order."""

    def __init__(self, options: Options, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        options.root.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="imgprep-chaos-", dir=options.root))
        self.started = time.monotonic()
        self.redis_server: RedisServer | SentinelRedis | None = None
        self.catalogue: list[SourceImage] = []
        self.server: SourceServer | None = None
        self.denied: DeniedListener | None = None
        self.cluster: Cluster | None = None
        self.client: PlainClient | None = None
        self.history: History | None = None
        self.workload: Workload | None = None
        self.nemesis: Nemesis | None = None
        self.summary: Summary | None = None
        self.notes: list[str] = []
        # beside the campaign's directory, not in it: its daemons are no leftover of imgprep's
        self.ceph: CephCluster | None = None

    def start(self) -> None:
        options = self.options
        self.say(f"campaign: seed {options.seed}, {options.duration:.0f} s, root {self.root}")
        self.catalogue = build_catalogue(self.root / "served", options.seed)
        rates = {image.name: image.rate for image in self.catalogue}
        self.server = SourceServer(self.root / "served", rates).start()
        self.denied = DeniedListener().start()
        outside = self.root / "outside" / "secret.raw"  # under no root a request may name
        outside.parent.mkdir()
        outside.write_bytes(random.Random(f"outside-{options.seed}").randbytes(4 * 2**20))
        if options.rbd:
            directory = Path(tempfile.mkdtemp(prefix="imgprep-chaos-ceph-", dir=options.root))
            directory.chmod(0o755)  # the workers' user reads the client's conf and keyring
            self.ceph = CephCluster(directory, cephx=True, persistent=True).start()
            self.say(f"ceph cluster {self.ceph.fsid} in {directory}")
        if options.sentinel:
            self.redis_server = SentinelRedis(self.root / "redis").start()
        else:
            self.redis_server = start_redis(self.root / "redis", socket_timeout=5)
        self.cluster = make_cluster(
            self.root,
            self.redis_server,
            hosts=options.hosts,
            workers=options.workers,
            concurrency=options.concurrency,
            tuning=options.tuning,
            privsep=options.privsep,
            extra_env={
                **(self.ceph.env() if self.ceph is not None else {}),
                # a step that waits on a dead monitor gives up and retries within a step
                "IMGPREP_RBD__CONNECT_TIMEOUT_SECONDS": "10",
            },
        )
        for slot in self.cluster.slots:
            self.cluster.start(slot)
        self.cluster.wait_ready()
        self.client = PlainClient(
            self.redis_server.url,
            self.redis_server.master_name if isinstance(self.redis_server, SentinelRedis) else None,
        )
        self.history = History(options.seed)
        self.workload = Workload(
            seed=options.seed,
            catalogue=self.catalogue,
            hosts=[host.id for host in self.cluster.hosts],
            server=self.server,
            places=Places(
                denied=self.denied,
                outside_file=outside,
                hosts={host.id: host for host in self.cluster.hosts},
                cache_dir=self.cluster.cache_dir,
            ),
            client=self.client,
            history=self.history,
            options=options.workload,
        )
        self.nemesis = Nemesis(
            seed=options.seed,
            cluster=self.cluster,
            server=self.server,
            catalogue=self.catalogue,
            history=self.history,
            options=options.nemesis,
            lease=options.tuning.lease_seconds,
            ceph=self.ceph,
        )

    def run(self) -> None:
        """The workload under the nemesis; then the nemesis heals and every request ends."""
        assert self.workload and self.history and self.nemesis and self.cluster
        self.nemesis.start()
        _drive(self.workload, self.history, self.say, until=self.options.duration, issuing=True)
        self.nemesis.stop()
        if self.nemesis.error is not None:
            raise RuntimeError(
                f"the nemesis failed: {self.nemesis.error!r}"
            ) from self.nemesis.error
        self.say(f"t={self.history.now():.0f}s nemesis stopped; waiting for every request to end")
        self.cluster.wait_ready()
        _drive(self.workload, self.history, self.say, until=None, issuing=False)
        assert self.redis_server is not None
        self.notes = _settle(self.cluster, self.redis_server.client(), self.options.tuning)
        self.say(f"t={self.history.now():.0f}s quiet; checking")

    def check(self) -> Summary:
        assert self.workload and self.history and self.nemesis and self.cluster
        world = World(
            catalogue={image.name: image for image in self.catalogue},
            hosts={host.id: host for host in self.cluster.hosts},
            cache_dir=self.cluster.cache_dir,
            fsid=self.ceph.fsid if self.ceph is not None else None,
        )
        assert self.redis_server is not None
        client = self.redis_server.client()
        try:
            violations = check_history(self.history, world) + check_final_state(
                self.history, world, self.workload.disks, client, self.root
            )
            if self.ceph is not None:
                violations += check_rbd_state(
                    world, self.workload.disks, self.ceph, client, self.root
                )
        finally:
            client.close()
        violations += [Violation("workers-stay-up", t) for t in self.cluster.unexpected_exits]
        assert self.denied is not None
        if self.denied.connections:
            violations.append(
                Violation(
                    "denied-never-contacted",
                    f"the denied address {self.denied.url('')} got "
                    f"{self.denied.connections} connections",
                )
            )
        history = self.history
        return Summary(
            seed=self.options.seed,
            operations=len(history.ops),
            faults=len(history.faults),
            ended=sum(1 for op in history.ops if op.ended),
            lost=sum(1 for op in history.ops if op.outcome in ("lost", "pending")),
            violations=violations,
            faults_by_kind=dict(history.faults_by_kind()),
            skipped_faults=self.nemesis.skipped,
            outcomes=dict(Counter(history.outcomes_by_class())),
            seconds=time.monotonic() - self.started,
            late=sum(1 for op in history.ops if op.late),
            longest=max(
                (op.complete - op.invoke for op in history.ops if op.complete is not None),
                default=0.0,
            ),
            notes=self.notes,
        )

    def stop(self) -> None:
        """Stop everything started, by pid; release what imgprep left; remove the directory.
        Each step runs even when one before it failed."""
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.nemesis is not None:
            steps.append(("heal the nemesis's faults", self.nemesis.stop))
        if self.client is not None:
            steps.append(("close the client", self.client.close))
        if self.cluster is not None:
            steps.append(("stop the workers", self.cluster.stop_all))
        if self.server is not None:
            steps.append(("stop the image server", self.server.stop))
        if self.denied is not None:
            steps.append(("stop the denied listener", self.denied.stop))
        if self.redis_server is not None:
            steps.append(("stop redis-server", self.redis_server.stop))
        if self.ceph is not None:
            ceph = self.ceph
            steps.append(("stop the Ceph cluster", ceph.stop))
            steps.append(("remove the Ceph cluster's files",
                          lambda: shutil.rmtree(ceph.directory, ignore_errors=True)))  # fmt: skip
        steps.append(("release mounts, devices, daemons", self._release))
        if self.options.report is not None and self.history is not None:
            report, history = self.options.report, self.history
            steps.append(
                (
                    "write the report",
                    lambda: _write_report(report, history, self.summary, self.root),
                )
            )
        for what, step in steps:
            try:
                step()
            except Exception as error:  # go on: the next step must still run
                self.say(f"note: could not {what}: {error!r}")
        if self.options.keep:
            self.say(f"note: kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def _release(self) -> None:
        for done in machine.release_everything_under(self.root):
            self.say(f"note: cleaned up after imgprep: {done}")


def _drive(
    workload: Workload,
    history: History,
    say: Callable[[str], None],
    *,
    until: float | None,
    issuing: bool,
) -> None:
    """Run the workload until `until` seconds (issuing), or until every request has ended."""
    last_report = history.now()
    while (history.now() < until) if until is not None else not workload.idle:
        workload.tick(issuing=issuing)
        if history.now() - last_report >= PROGRESS_EVERY:
            last_report = history.now()
            ended = sum(1 for op in history.ops if op.ended)
            say(
                f"t={last_report:.0f}s operations={len(history.ops)} ended={ended} "
                f"in_flight={len(workload.in_flight)} faults={len(history.faults)}"
            )
        time.sleep(TICK)


def _settle(cluster: Cluster, client: redis.Redis, tuning: Tuning) -> list[str]:
    """Wait until no worker runs a task and every lease has been released or has lapsed."""
    notes = []
    deadline = time.monotonic() + SETTLE_TIMEOUT
    try:
        while time.monotonic() < deadline:
            active = cluster.control.control.inspect(timeout=1.0).active() or {}
            if not any(active.values()):
                break
            time.sleep(0.5)
        else:
            notes.append(f"note: workers still ran tasks {SETTLE_TIMEOUT:.0f} s after the end")
        lapse = time.monotonic() + tuning.lease_seconds * 2 + 1
        while time.monotonic() < lapse and any(client.scan_iter(match=LOCK_PREFIX + "*")):
            time.sleep(0.2)
    finally:
        client.close()
    return notes


def _write_report(path: Path, history: History, summary: Summary | None, root: Path) -> None:
    report = {
        "summary": summary.to_json() if summary else None,
        "root": str(root),
        "history": history.to_json(),
    }
    path.write_text(json.dumps(report, indent=1, default=str))
