"""The operations of a campaign and the client's model of the disks they make.

Intents come from the seed: each draws the same five random numbers whatever the state, so a
seed always yields the same stream of intents (kind, image, backend, host, size, think time).
Which disk an intent acts on depends on which disks exist when it is issued, and so on timing:
two runs of one seed issue the same intents but may pick other disks and see other outcomes.

Operations on one disk never overlap (the client waits for one to end before sending the next),
so every outcome can be checked against the model: a successful prepare's disk exists until a
delete of it succeeds. A disk whose operation was lost is never touched again.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
from kombu.exceptions import OperationalError

from bench.chaos.catalogue import SourceImage
from bench.chaos.client import Outcome, PlainClient
from bench.chaos.cluster import Host
from bench.chaos.history import History, Op
from bench.chaos.sources import DeniedListener, SourceServer

MiB = 2**20
DEFAULT_QUEUE = "imgprep"  # the wire contract's queue (README, "The wire contract")
UNKNOWN_HOST = "ghost"  # a host id no worker has
RESEND_EVERY = 0.5

# kind → share of the stream; the hostile kinds send requests that must fail, typed
MIX: tuple[tuple[str, float], ...] = (
    ("prepare", 0.34),
    ("burst", 0.04),  # BURST prepares of one image at once, on both hosts
    ("prepare_inject", 0.13),
    ("snapshot", 0.12),
    ("delete", 0.18),
    ("evict", 0.08),
    ("prepare_again", 0.07),
    ("bad_checksum", 0.02),
    ("unknown_host", 0.01),
    ("bad_url", 0.01),
    ("denied_source", 0.01),
    ("reserved_name", 0.01),
    ("direct_step", 0.01),
    ("conflict", 0.02),
)
HOSTILE = (
    "bad_checksum",
    "unknown_host",
    "bad_url",
    "denied_source",
    "reserved_name",
    "direct_step",
    "conflict",
)
BURST = 4
TASKS = {
    "prepare": "imgprep.prepare_disk",
    "burst": "imgprep.prepare_disk",
    "prepare_inject": "imgprep.prepare_disk",
    "prepare_again": "imgprep.prepare_disk",
    "bad_checksum": "imgprep.prepare_disk",
    "unknown_host": "imgprep.prepare_disk",
    "bad_url": "imgprep.prepare_disk",
    "denied_source": "imgprep.prepare_disk",
    "conflict": "imgprep.prepare_disk",
    "reserved_name": "imgprep.delete_disk",
    "direct_step": "imgprep.convert",  # a step, not an entry task: anyone on the broker can
    "snapshot": "imgprep.snapshot",
    "delete": "imgprep.delete_disk",
    "evict": "imgprep.evict_cache",
}

DiskState = Literal["creating", "present", "unknown", "absent", "tainted"]


@dataclass
class Disk:
    """What the client knows of one instance disk."""

    host: str
    instance_id: str
    disk_name: str
    image: SourceImage
    backend: str
    size: int
    request: dict[str, Any]  # the prepare request that makes it
    state: DiskState = "creating"
    busy: bool = True
    prepared: dict[str, Any] | None = None  # the last PreparedDisk
    injected: dict[str, str] = field(default_factory=dict)  # guest path → content

    @property
    def name(self) -> str:
        return f"{self.host}/{self.instance_id}/{self.disk_name}"


@dataclass(frozen=True)
class Intent:
    kind: str
    draws: tuple[float, float, float, float]
    think: float  # seconds to wait before the next intent


@dataclass(frozen=True)
class Places:
    """Where hostile requests point: the denied source, a file outside every root, the hosts'
    directories and the cache directory."""

    denied: DeniedListener
    outside_file: Path
    hosts: dict[str, Host]  # by host id
    cache_dir: Path


@dataclass(frozen=True)
class WorkloadOptions:
    in_flight: int = 8
    stuck_after: float = 30.0
    # a request running past its deadline is late, and still followed: lost is a request that
    # has not ended `late_allowance` seconds after its deadline (a whole retry budget of steps
    # at their time limit: under continuous faults and a queue of work, a request may take that
    # long and still end)
    op_timeout: float = 240.0
    late_allowance: float = 600.0
    unknown_host_timeout: float = 60.0
    max_disks: int = 30
    hostile: bool = True
    max_think: float = 0.3
    # a third of the prepares on the rbd backend (a Ceph cluster the campaign starts), with
    # their snapshots (extract or direct), deletes and agings
    rbd: bool = False


def intents(rng: random.Random, options: WorkloadOptions) -> Intent:
    """The next intent of the stream (always five draws)."""
    roll = rng.random()
    draws = (rng.random(), rng.random(), rng.random(), rng.random())
    think = rng.random() * options.max_think
    mix = [(k, w) for k, w in MIX if options.hostile or k not in HOSTILE]
    total = sum(w for _, w in mix)
    point = roll * total
    for kind, weight in mix:
        point -= weight
        if point < 0:
            return Intent(kind, draws, think)
    return Intent(mix[-1][0], draws, think)


def pick(items: Sequence[Any], draw: float) -> Any:
    return items[min(int(draw * len(items)), len(items) - 1)]


class Workload:
    """Issues intents as operations, at most `in_flight` at once, and follows their outcomes."""

    def __init__(
        self,
        *,
        seed: int,
        catalogue: list[SourceImage],
        hosts: list[str],
        server: SourceServer,
        places: Places,
        client: PlainClient,
        history: History,
        options: WorkloadOptions,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(f"workload-{seed}")
        self.catalogue = catalogue
        self.hosts = hosts
        self.server = server
        self.places = places
        self.client = client
        self.history = history
        self.options = options
        self.disks: list[Disk] = []
        self.in_flight: dict[str, Op] = {}
        self._disk_of: dict[str, Disk] = {}
        self._unsent: dict[str, float] = {}  # task id → when to try again
        self._next_issue = 0.0
        self._instances = 0

    # -- the loop --------------------------------------------------------------------------

    def tick(self, *, issuing: bool) -> None:
        """One turn: resend what could not be sent, read outcomes, issue what there is room for."""
        now = self.history.now()
        self._resend(now)
        self._poll(now)
        # an operation running for long (waiting out a visibility timeout, or never to end) stops
        # counting against the bound, so one stuck request does not starve the workload
        young = sum(
            1 for op in self.in_flight.values() if now - op.invoke < self.options.stuck_after
        )
        if issuing and young < self.options.in_flight and now >= self._next_issue:
            intent = intents(self.rng, self.options)
            self._next_issue = now + intent.think
            self._issue(intent)

    @property
    def idle(self) -> bool:
        return not self.in_flight

    # -- issuing ---------------------------------------------------------------------------

    def _issue(self, intent: Intent) -> None:
        a, b, c, d = intent.draws
        kind = intent.kind
        idle = [disk for disk in self.disks if not disk.busy]
        present = [disk for disk in idle if disk.state == "present"]
        removable = [disk for disk in idle if disk.state in ("present", "unknown")]
        overlays = [disk for disk in present if disk.backend == "qcow2"]
        alive = sum(1 for disk in self.disks if disk.state not in ("absent", "tainted"))
        if kind in ("prepare", "prepare_inject", "burst") and alive >= self.options.max_disks:
            kind = "delete"
        if (
            (kind in ("snapshot", "prepare_again", "reserved_name") and not present)
            or (kind == "delete" and not removable)
            or (kind == "conflict" and not overlays)
        ):
            kind = "prepare"
        on_disk = {
            "prepare_again": lambda: self._again(pick(present, a)),
            "snapshot": lambda: self._snapshot(pick(present, a), b, c),
            "delete": lambda: self._delete(pick(removable, a)),
            "conflict": lambda: self._conflict(pick(overlays, a), b),
            "reserved_name": lambda: self._reserved_name(pick(present, a)),
            "direct_step": lambda: self._direct_step(present, a, b, c),
        }
        if kind == "prepare":
            self._prepare(kind, pick(self.catalogue, a), (b, c, d))
        elif kind == "burst":  # one image for all, each on its own host and backend
            image = pick(self.catalogue, a)
            for n in range(BURST):
                self._prepare(kind, image, ((b + n / BURST) % 1, (c + n / BURST) % 1, d))
        elif kind == "prepare_inject":
            self._prepare(kind, pick([i for i in self.catalogue if i.guest], a), (b, c, d))
        elif kind in on_disk:
            on_disk[kind]()
        elif kind == "evict":
            self._evict(a, b, c, d)
        else:
            self._hostile(kind, a, b, c, d)

    def _again(self, disk: Disk) -> None:
        self._send("prepare_again", disk.request, disk=disk, context={"previous": disk.prepared})

    def _delete(self, disk: Disk) -> None:
        request: dict[str, Any] = {
            "api_version": 1,
            "instance_id": disk.instance_id,
            "disk_name": disk.disk_name,
            "host": disk.host,
        }
        if disk.backend == "rbd":
            request["backend"] = "rbd"
        self._send("delete", request, disk=disk, context={"state_before": disk.state})

    def _new_instance(self) -> str:
        self._instances += 1
        return f"vm-{self._instances:05d}"

    def _prepare_request(
        self, image: SourceImage, host: str, instance: str, backend: str, size: int
    ) -> dict[str, Any]:
        source: dict[str, Any] = {"url": self.server.url(image.name), "image_id": image.image_id}
        if image.checksum:
            source["checksum"] = f"sha256:{image.sha256}"
        return {
            "api_version": 1,
            "image": source,
            "disk": {
                "instance_id": instance,
                "disk_name": "disk",
                "size_bytes": size,
                "backend": backend,
            },
            "host": host,
        }

    def _prepare(self, kind: str, image: SourceImage, draws: tuple[float, float, float]) -> None:
        b, c, d = draws
        inject = kind == "prepare_inject" or (kind == "burst" and image.guest and b < 0.5)
        backend = "raw" if b < 0.35 else "qcow2"
        if self.options.rbd and b >= 0.65:
            backend = "rbd"
        host = pick(self.hosts, c)
        size = 48 * MiB if d < 0.5 else 64 * MiB
        instance = self._new_instance()
        request = self._prepare_request(image, host, instance, backend, size)
        disk = Disk(host, instance, "disk", image, backend, size, request)
        if inject:
            path = f"/etc/chaos-{instance}"
            content = f"{instance} seed {self.seed}\n"
            request["inject"] = [{"path": path, "content": content, "mode": 0o600}]
            disk.injected = {path: content}
        self.disks.append(disk)
        self._send(kind, request, disk=disk, image=image.name)

    def _snapshot(self, disk: Disk, b: float, c: float) -> None:
        fmt = "qcow2" if b < 0.6 else "raw"
        if disk.backend == "rbd" and c >= 0.5:  # Nova's direct snapshot, into the images pool
            self._instances += 1
            direct = {
                "api_version": 1,
                "instance_id": disk.instance_id,
                "disk_name": disk.disk_name,
                "host": disk.host,
                "backend": "rbd",
                "method": "direct",
                "image_id": f"chaos-snap-{self.seed}-{self._instances:05d}",
            }
            self._send("snapshot", direct, disk=disk)
            return
        request: dict[str, Any] = {
            "api_version": 1,
            "instance_id": disk.instance_id,
            "disk_name": disk.disk_name,
            "target": f"{disk.instance_id}/{uuid.uuid4().hex[:8]}.{fmt}",
            "format": fmt,
            "compress": fmt == "qcow2" and c < 0.3,
            "host": disk.host,
        }
        if disk.backend == "rbd":
            request["backend"] = "rbd"
        self._send("snapshot", request, disk=disk)

    def _evict(self, a: float, b: float, c: float, d: float) -> None:
        request: dict[str, Any] = {"api_version": 1, "dry_run": False}
        if self.options.rbd and d >= 0.7:  # the images pool, on a worker of a host
            request["backend"] = "rbd"
            request["remove_unused_original_minimum_age_seconds"] = round(b * 5, 1)
            self._send("evict", request, queue=f"imgprep.host.{pick(self.hosts, c)}")
            return
        if a < 0.5:
            request["remove_unused_original_minimum_age_seconds"] = 0
        elif a < 0.8:
            request["remove_unused_original_minimum_age_seconds"] = round(b * 5, 1)
        else:
            request["max_bytes"] = 1  # the size cap alone: every unused entry must go
        queue = DEFAULT_QUEUE if c < 0.5 else f"imgprep.host.{pick(self.hosts, d)}"
        self._send("evict", request, queue=queue)

    def _hostile(self, kind: str, a: float, b: float, c: float, d: float) -> None:
        """Requests that must end with a typed error: no disk may come of them."""
        image = pick([i for i in self.catalogue if not i.guest], a)
        instance = self._new_instance()
        host = pick(self.hosts, c)
        request = self._prepare_request(image, host, instance, "qcow2", 48 * MiB)
        context: dict[str, Any] = {"instance": instance}
        timeout = self.options.op_timeout
        if kind == "bad_checksum":
            request["image"]["image_id"] = f"{image.image_id}-badsum-{instance}"
            request["image"]["checksum"] = "sha256:" + "0" * 64
            context["expect"] = ["ChecksumMismatch"]
        elif kind == "unknown_host":
            request["host"] = UNKNOWN_HOST
            context["expect"] = ["<PermanentError>"]
            timeout = self.options.unknown_host_timeout
        elif kind == "denied_source":
            # an image id of its own (never cached), on the address the workers may not reach
            request["image"]["image_id"] = f"{image.image_id}-denied-{instance}"
            request["image"]["url"] = self.places.denied.url(image.name)
            context["expect"] = ["SourceNotAllowed"]
        else:
            request["image"]["url"] = f"http://127.0.0.1:99999/{image.name}"
            context["expect"] = ["InvalidRequest"]
        self._send(kind, request, image=image.name, context=context, timeout=timeout)

    def _conflict(self, disk: Disk, b: float) -> None:
        """The request of a disk that exists (a qcow2 overlay), with another image: DiskConflict,
        and nothing of the other image may stay claimed for that disk (issue 11, #11)."""
        other = pick([i for i in self.catalogue if i.name != disk.image.name], b)
        request = self._prepare_request(other, disk.host, disk.instance_id, disk.backend, disk.size)
        context = {"expect": ["DiskConflict"], "uses": disk.image.name}
        self._send("conflict", request, disk=disk, image=other.name, context=context)

    def _reserved_name(self, disk: Disk) -> None:
        """A delete of an instance's format record, `disk.info` (issue 11, #7): InvalidRequest,
        and the instance's disks keep their record (the final state's `disk-record`)."""
        request = {
            "api_version": 1,
            "instance_id": disk.instance_id,
            "disk_name": "disk.info",
            "host": disk.host,
        }
        self._send("reserved_name", request, disk=disk, context={"expect": ["InvalidRequest"]})

    def _direct_step(self, present: list[Disk], a: float, b: float, c: float) -> None:
        """A conversion step sent straight to a host's queue, as anyone who can write to the broker
        could (issue 11, #8): from a file outside every root into the snapshots directory, or
        from an instance disk into the cache directory. InvalidRequest; nothing written."""
        self._instances += 1
        name = f"stolen-{self._instances:05d}.raw"
        present = [disk for disk in present if disk.backend != "rbd"]  # no file to steal
        if b < 0.5 or not present:
            host = self.places.hosts[pick(self.hosts, c)]
            source, source_format = self.places.outside_file, "raw"
            target = host.snapshots_dir / name
        else:
            disk = pick(present, a)
            host = self.places.hosts[disk.host]
            source = host.instances_dir / disk.instance_id / disk.disk_name
            source_format = disk.backend
            target = self.places.cache_dir / name
        job = {
            "kind": "convert_job",
            "source": str(source),
            "source_format": source_format,
            "target": str(target),
            "target_format": "raw",
            "compress": False,
        }
        context = {"expect": ["InvalidRequest"], "must_not_exist": str(target)}
        self._send("direct_step", job, queue=f"imgprep.host.{host.id}", context=context)

    def _send(
        self,
        kind: str,
        request: dict[str, Any],
        *,
        disk: Disk | None = None,
        image: str | None = None,
        queue: str = DEFAULT_QUEUE,
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        now = self.history.now()
        op = self.history.add_op(
            Op(
                index=len(self.history.ops),
                id=str(uuid.uuid4()),
                kind=kind,
                task=TASKS[kind],
                request=request,
                invoke=now,
                deadline=now + (timeout or self.options.op_timeout),
                disk=disk.name if disk else None,
                image=image or (disk.image.name if disk else None),
                context={**(context or {}), "queue": queue},
            )
        )
        if disk is not None:
            disk.busy = True
            self._disk_of[op.id] = disk
        self.in_flight[op.id] = op
        self._try_send(op)

    def _try_send(self, op: Op) -> None:
        op.sends += 1
        try:
            self.client.send(op.task, op.request, op.id, op.context["queue"])
        except (OperationalError, redis.RedisError, ConnectionError, OSError):
            self._unsent[op.id] = self.history.now() + RESEND_EVERY
            return
        self._unsent.pop(op.id, None)

    def _resend(self, now: float) -> None:
        for task_id, when in list(self._unsent.items()):
            if when <= now and task_id in self.in_flight:
                self._try_send(self.in_flight[task_id])

    # -- outcomes ----------------------------------------------------------------------------

    def _poll(self, now: float) -> None:
        sent = [task_id for task_id in self.in_flight if task_id not in self._unsent]
        try:
            found = self.client.outcomes(sent)
        except redis.RedisError:
            found = {}  # Redis is restarting: read again next turn
        for task_id, outcome in found.items():
            self._ended(self.in_flight.pop(task_id), outcome)
        for task_id, op in list(self.in_flight.items()):
            if now > op.deadline + self.options.late_allowance:
                del self.in_flight[task_id]
                self._unsent.pop(task_id, None)
                self.history.end_op(op, "lost")
                self._settle(op, "lost")

    def _ended(self, op: Op, outcome: Outcome) -> None:
        if outcome.state == "SUCCESS":
            self.history.end_op(op, "ok", result=outcome.result)
            self._settle(op, "ok")
        else:
            error = (
                outcome.error_class or outcome.state,
                outcome.error_module or "",
                outcome.error_message or "",
            )
            self.history.end_op(op, "error", error=error)
            self._settle(op, "error")

    def _settle(self, op: Op, outcome: str) -> None:
        """Bring the model of the op's disk up to date."""
        disk = self._disk_of.pop(op.id, None)
        if disk is None:
            return
        disk.busy = False
        if outcome == "lost":
            disk.state = "tainted"
            disk.busy = True  # never touched again
        elif op.kind in ("prepare", "prepare_inject", "prepare_again", "burst"):
            disk.state = "present" if outcome == "ok" else "unknown"
            if outcome == "ok":
                disk.prepared = op.result
        elif op.kind == "delete":
            disk.state = "absent" if outcome == "ok" else "unknown"
            disk.busy = outcome == "ok"  # a deleted disk is never touched again
