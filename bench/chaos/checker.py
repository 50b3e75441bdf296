"""The checker over the history: every request ended with a result or an error a person can act
on, every result says what the request asked for, and no eviction removed a base in use.

Which errors are acceptable ends of a request depends on the faults that overlapped it
(`EXPLAINED_BY`): a transient error after its retries ran out is acceptable only under a fault
that causes it; anything else — a raw OperationalError, Reject, TimeLimitExceeded, ImageRefused
of a valid image, CoordinationUnavailable while Redis was up — is a violation. Requests that
must fail (hostile ones) must fail with their own error class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from bench.chaos.catalogue import SourceImage
from bench.chaos.cluster import Host
from bench.chaos.history import History, Op
from domain.core import errors
from domain.core.models import CacheEvictionReport, DeletedDisk, PreparedDisk
from domain.formats.snapshot_models import ConvertedImage, RbdSnapshot
from worker.app.results import ERRORS_WIRE_MODULE

# error class → the faults under whose influence it is an acceptable end of a request
EXPLAINED_BY: dict[str, tuple[str, ...]] = {
    # a pool process killed mid-step counts as a retry; kills may exhaust the budget
    "WorkerLostError": ("kill_pool", "kill_worker"),
    # a holder paused or killed past its lease, or cut off from Redis, must not publish
    "LockLost": ("pause_holder", "kill_pool", "kill_worker", "redis_restart", "failover"),
    # a holder kept its lock past lock.wait_seconds: paused, or downloading a stalled source
    "LockBusy": ("pause_holder", "stall_source", "trickle_source", "kill_osd", "kill_mon"),
    "DiskBusy": ("pause_holder", "kill_pool", "kill_worker"),
    # a restarted worker's janitor released the devices of an injection whose worker died: the
    # redelivered step cannot go on, and says to prepare the disk again
    "DeviceError": ("kill_worker",),
    "CoordinationUnavailable": ("redis_restart", "failover"),
    "SourceUnavailable": ("stall_source",),
    # the source sent less than fetch.min_bytes_per_second over fetch.rate_window_seconds
    "SourceTooSlow": ("trickle_source", "stall_source"),
    "StepTimedOut": ("stall_source", "pause_holder"),
    # the Ceph cluster's monitor (or OSD) was down longer than the retries lasted
    "CephUnavailable": ("kill_mon", "kill_osd"),
    # an image whose importer was killed keeps its watch for 30 s; a guest-less export too
    "RbdImageBusy": ("kill_pool", "kill_worker", "kill_helper"),
}
# Errors that say what the last attempt met: only a fault in the last seconds of the request
# explains them (a Redis restart minutes earlier does not explain a socket timeout now).
RECENT: dict[str, float] = {
    "CoordinationUnavailable": 20.0,
    "SourceUnavailable": 20.0,
    "SourceTooSlow": 20.0,
}
GRACE = 2.0  # seconds a fault's effects outlast its end
PREPARES = ("prepare", "prepare_inject", "prepare_again", "burst")
# faults after which a step may run again (its message put back): a delete's second run finds
# the disk its first run removed, and reports existed: false
RERUN_BY = ("kill_pool", "kill_worker", "redis_restart", "failover", "kill_helper")


@dataclass(frozen=True)
class Violation:
    invariant: str
    text: str
    op: int | None = None

    def describe(self) -> str:
        return f"[{self.invariant}] {self.text}"


@dataclass(frozen=True)
class World:
    """What the checker needs to know of the campaign's layout."""

    catalogue: dict[str, SourceImage]  # by file name
    hosts: dict[str, Host]  # by host id
    cache_dir: Path
    fsid: str | None = None  # the Ceph cluster's, with --rbd


def check_history(history: History, world: World) -> list[Violation]:
    found = []
    for op in history.ops:
        if op.outcome == "error":
            found += check_error(op, history)
        elif op.outcome == "ok":
            found += check_result(op, world, history)
    found += check_evictions(history, world)
    return found


# -- errors --------------------------------------------------------------------------------


def is_permanent(error_class: str, module: str | None) -> bool:
    cls = getattr(errors, error_class, None)
    return (
        module == ERRORS_WIRE_MODULE
        and isinstance(cls, type)
        and issubclass(cls, errors.PermanentError)
    )


def check_error(op: Op, history: History) -> list[Violation]:
    error_class = op.error_class or "?"
    expected = op.context.get("expect", [])
    if error_class in expected or (
        "<PermanentError>" in expected and is_permanent(error_class, op.error_module)
    ):
        return []
    faults = history.faults_during(op, GRACE)
    recent = RECENT.get(error_class)
    if recent is not None and op.complete is not None:
        faults = [f for f in faults if f.overlaps(op.complete - recent, op.complete, GRACE)]
    kinds = {fault.kind for fault in faults}
    typed = op.error_module == ERRORS_WIRE_MODULE or error_class == "WorkerLostError"
    if typed and kinds & set(EXPLAINED_BY.get(error_class, ())):
        return []
    under = ", ".join(sorted(f"{f.kind}#{f.index}" for f in faults)) or "no fault"
    return [
        Violation(
            "request-ended-acceptably",
            f"{op.describe()} failed with {op.error_module}.{error_class}: "
            f"{(op.error_message or '')[:300]} (under {under})",
            op.index,
        )
    ]


# -- results -------------------------------------------------------------------------------


def _parse(model: type[BaseModel], op: Op) -> tuple[Any, list[Violation]]:
    try:
        return model.model_validate(op.result), []
    except ValidationError as error:
        text = f"{op.describe()} succeeded with a result that is not a {model.__name__}: {error}"
        return None, [Violation("result-schema", text[:600], op.index)]


def check_result(op: Op, world: World, history: History | None = None) -> list[Violation]:
    if "expect" in op.context:
        return [
            Violation(
                "hostile-refused",
                f"{op.describe()} succeeded; it must fail with {op.context['expect']}",
                op.index,
            )
        ]
    if op.kind in PREPARES:
        return check_prepared(op, world)
    if op.kind == "snapshot":
        direct = op.request.get("method") == "direct"
        return _parse(RbdSnapshot if direct else ConvertedImage, op)[1]
    if op.kind == "evict":
        return _parse(CacheEvictionReport, op)[1]
    if op.kind == "delete":
        deleted, found = _parse(DeletedDisk, op)
        was_present = op.context.get("state_before") == "present"
        rerun = history is not None and any(
            fault.kind in RERUN_BY for fault in history.faults_during(op, GRACE)
        )
        if deleted is not None and was_present and not deleted.existed and not rerun:
            found.append(
                Violation(
                    "prepared-disk-exists",
                    f"{op.describe()}: the disk a successful prepare made was gone before "
                    "this delete (existed: false)",
                    op.index,
                )
            )
        return found
    return []


def check_prepared(op: Op, world: World) -> list[Violation]:
    prepared, found = _parse(PreparedDisk, op)
    if prepared is None:
        return found
    assert isinstance(prepared, PreparedDisk)
    request = op.request
    image = world.catalogue[str(op.image)]
    host = world.hosts[request["host"]]
    wanted_disk = request["disk"]
    if wanted_disk["backend"] == "rbd":
        expected = _expected_rbd(wanted_disk, image, host.id, world)
    else:
        expected = _expected_file(wanted_disk, image, host, world)
    actual = {
        name: getattr(getattr(prepared, name.split(".")[0]), name.split(".")[1])
        for name in expected
    }
    for name, value in expected.items():
        if actual[name] != value:
            found.append(
                Violation(
                    "prepared-result",
                    f"{op.describe()}: {name} is {actual[name]!r}, expected {value!r}",
                    op.index,
                )
            )
    return found + _check_files_and_again(op, prepared)


def _expected_rbd(
    wanted_disk: dict[str, Any], image: SourceImage, host: str, world: World
) -> dict[str, object]:
    """An rbd disk: the clone <instance>_<disk> in vms of the image imported into images."""
    location = f"rbd://{world.fsid}/images/{image.key}/snap"
    return {
        "disk.path": f"rbd:vms/{wanted_disk['instance_id']}_{wanted_disk['disk_name']}",
        "disk.host": host,
        "disk.format": "raw",
        "disk.backend": "rbd",
        "disk.virtual_size": wanted_disk["size_bytes"],
        "disk.backing_file": location,
        "base.key": image.key,
        "base.image_id": image.image_id,
        "base.path": location,
        "base.format": "raw",
        "base.virtual_size": image.virtual_size,
        "base.source_sha256": image.sha256,
    }


def _expected_file(
    wanted_disk: dict[str, Any], image: SourceImage, host: Host, world: World
) -> dict[str, object]:
    return {
        "disk.path": str(
            host.instances_dir / wanted_disk["instance_id"] / wanted_disk["disk_name"]
        ),
        "disk.host": host.id,
        "disk.format": wanted_disk["backend"],
        "disk.virtual_size": wanted_disk["size_bytes"],
        "disk.backing_file": str(world.cache_dir / image.key)
        if wanted_disk["backend"] == "qcow2"
        else None,
        "base.key": image.key,
        "base.image_id": image.image_id,
        "base.path": str(world.cache_dir / image.key),
        "base.format": "raw",
        "base.virtual_size": image.virtual_size,
        "base.source_sha256": image.sha256,
    }


def _check_files_and_again(op: Op, prepared: PreparedDisk) -> list[Violation]:
    found = []
    request = op.request
    wanted_files = {item["path"] for item in request.get("inject", [])}
    if {item.path for item in prepared.injected} != wanted_files:
        found.append(
            Violation(
                "prepared-result",
                f"{op.describe()}: injected {[i.path for i in prepared.injected]}, "
                f"asked for {sorted(wanted_files)}",
                op.index,
            )
        )
    previous = op.context.get("previous")
    if op.kind == "prepare_again" and previous and previous["disk"] != op.result["disk"]:  # type: ignore[index]
        found.append(
            Violation(
                "duplicate-same-result",
                f"{op.describe()}: the same request sent again describes another disk",
                op.index,
            )
        )
    return found


# -- evictions -------------------------------------------------------------------------------


def present_intervals(history: History) -> dict[str, list[tuple[float, float, Op]]]:
    """Per disk: from each successful prepare's end to the next delete's invoke (or forever),
    the times the disk certainly existed, with the prepare that made it."""
    by_disk: dict[str, list[Op]] = {}
    for op in history.ops:
        if op.disk is not None:
            by_disk.setdefault(op.disk, []).append(op)
    intervals: dict[str, list[tuple[float, float, Op]]] = {}
    for disk, ops in by_disk.items():
        for position, op in enumerate(ops):
            if op.kind not in PREPARES or op.outcome != "ok" or op.complete is None:
                continue
            later_deletes = [o.invoke for o in ops[position + 1 :] if o.kind == "delete"]
            until = min(later_deletes, default=float("inf"))
            intervals.setdefault(disk, []).append((op.complete, until, op))
    return intervals


def check_evictions(history: History, world: World) -> list[Violation]:
    """No eviction removed the base of a qcow2 disk that existed all through the eviction."""
    intervals = present_intervals(history)
    found = []
    for op in history.ops:
        if op.kind != "evict" or op.outcome != "ok" or op.complete is None or not op.result:
            continue
        if op.request.get("backend") == "rbd":
            continue  # the images pool: Ceph itself refuses to remove a parent with clones
        evicted = {item["key"] for item in op.result.get("evicted", [])}
        for disk, spans in intervals.items():
            for since, until, prepare in spans:
                if prepare.request["disk"]["backend"] != "qcow2":
                    continue  # a raw disk is a copy: it does not use its base once made
                key = world.catalogue[str(prepare.image)].key
                if key in evicted and since <= op.invoke and op.complete <= until:
                    found.append(
                        Violation(
                            "no-base-in-use-evicted",
                            f"{op.describe()} evicted {key}, the backing file of {disk} "
                            f"(made by op#{prepare.index}, not deleted)",
                            op.index,
                        )
                    )
    return found
