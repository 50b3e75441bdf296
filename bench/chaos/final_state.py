"""The checker over the final state, once the nemesis has stopped and every request has ended:

* the cache holds only entries and their records; every entry equals its source's raw conversion
  (sha256 against a fresh `qemu-img convert`) and its record agrees with it;
* Redis holds no lock key, no `pending/` reference, no device record, and every disk reference
  names a disk that exists, uses that base, and whose base exists;
* every instance disk has a format record and, when qcow2, a backing file that exists; no
  temporary file is left beside the disks or the snapshots, no device work directory in the
  hosts' state directories;
* every disk the client knows to exist exists as it was made (and holds its injected files);
  every disk whose delete succeeded, or whose request had to fail, does not;
* every snapshot is there with the sha256 its result reported;
* no mount, loop device or helper daemon is left under the campaign's directory.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from bench.chaos.catalogue import sha256_file
from bench.chaos.checker import Violation, World
from bench.chaos.history import History
from bench.chaos.workload import Disk
from domain.cache.directory import CacheRecord
from harness import machine
from worker.cli.demo.guest_files import read_guest_file
from worker.stores.redis_ledger import DEVICES_PREFIX
from worker.stores.redis_locks import LOCK_PREFIX
from worker.stores.redis_references import REFS_PREFIX
from worker.stores.replies import text

ENTRY = re.compile(r"^[0-9a-f]{40}$")
RECORD = re.compile(r"^[0-9a-f]{40}\.json$")
DISK_INFO = "disk.info"
TEMPORARY = re.compile(r"\.(part|converted|tmp)(\.|$)")  # also token-named ones: x.part.<token>
INJECTED_SAMPLE = 12


@dataclass(frozen=True)
class DiskFile:
    host: str
    instance: str
    name: str
    path: Path
    format: str | None  # from disk.info; None: no record
    backing: str | None


def check_final_state(
    history: History, world: World, disks: list[Disk], client: redis.Redis, root: Path
) -> list[Violation]:
    files = disk_files(world)
    found = check_cache(world)
    found += check_redis(client, world, files)
    found += check_instances(world, files)
    found += check_model(disks, files, client, world)
    found += check_hostile(history, files)
    found += check_snapshots(history, world)
    found += check_machine(root)
    found += check_helper_work_areas(root)
    return found


def check_helper_work_areas(root: Path) -> list[Violation]:
    """Work areas left in the helpers' devices trees (privilege separation puts them there)."""
    return [
        Violation("no-mount-left", f"device work directory {path} is left")
        for path in sorted(root.glob("run/*-helper/devices/*"))
    ]


# -- the cache -------------------------------------------------------------------------------


def check_cache(world: World) -> list[Violation]:
    by_key = {image.key: image for image in world.catalogue.values()}
    found = []
    names = sorted(p.name for p in world.cache_dir.iterdir())
    entries = {n for n in names if ENTRY.fullmatch(n)}
    records = {n.removesuffix(".json") for n in names if RECORD.fullmatch(n)}
    for name in names:
        if name not in entries and name.removesuffix(".json") not in records:
            found.append(Violation("no-temporary", f"cache holds {name}, not an entry or record"))
    for key in sorted(entries | records):
        image = by_key.get(key)
        if image is None:
            found.append(Violation("cache-entry", f"cache entry {key} is of no valid image"))
            continue
        if key not in records:
            found.append(Violation("cache-record", f"entry {key} ({image.name}) has no record"))
            continue
        if key not in entries:
            found.append(
                Violation("cache-record", f"record {key}.json ({image.name}) has no entry")
            )
            continue
        entry = world.cache_dir / key
        digest = sha256_file(entry)
        if digest != image.cached_sha256:
            found.append(
                Violation(
                    "cache-entry",
                    f"entry {key} ({image.name}) has sha256 {digest}, {entry.stat().st_size} "
                    f"bytes; a fresh raw conversion of the source has {image.cached_sha256}, "
                    f"{image.virtual_size} bytes",
                )
            )
        found += check_record(world.cache_dir / f"{key}.json", entry, image)
    return found


def check_record(path: Path, entry: Path, image: Any) -> list[Violation]:
    try:
        record = CacheRecord.model_validate_json(path.read_text())
    except (ValidationError, OSError) as error:
        return [Violation("cache-record", f"{path.name} is unreadable: {str(error)[:200]}")]
    expected = {
        "image.key": image.key,
        "image.image_id": image.image_id,
        "image.path": str(entry),
        "image.format": "raw",
        "image.virtual_size": image.virtual_size,
        "image.source_sha256": image.sha256,
        "source_format": image.format,
        "source_bytes": image.size,
    }
    actual = {
        "image.key": record.image.key,
        "image.image_id": record.image.image_id,
        "image.path": record.image.path,
        "image.format": record.image.format,
        "image.virtual_size": record.image.virtual_size,
        "image.source_sha256": record.image.source_sha256,
        "source_format": record.source_format,
        "source_bytes": record.source_bytes,
    }
    found = [
        Violation("cache-record", f"{path.name}: {name} is {actual[name]!r}, expected {value!r}")
        for name, value in expected.items()
        if actual[name] != value
    ]
    size = entry.stat().st_size
    if size != record.image.virtual_size:
        found.append(
            Violation(
                "cache-record",
                f"{path.name} says {record.image.virtual_size} bytes, the entry has {size}",
            )
        )
    return found


# -- Redis -------------------------------------------------------------------------------------


def check_redis(client: redis.Redis, world: World, files: dict[str, DiskFile]) -> list[Violation]:
    found = [
        Violation(
            "no-lock-left",
            f"lock key {text(key, 'replace')} is still held by {client.get(key)!r}",
        )
        for key in client.scan_iter(match=LOCK_PREFIX + "*")
    ]
    for key in client.scan_iter(match=DEVICES_PREFIX + "*"):
        for disk, raw in client.hgetall(key).items():
            found.append(
                Violation(
                    "no-device-left",
                    f"{text(key, 'replace')} still records devices of "
                    f"{text(disk, 'replace')}: {raw[:200]!r}",
                )
            )
    for raw_key in client.scan_iter(match=REFS_PREFIX + "*"):
        base = text(raw_key, "replace").removeprefix(REFS_PREFIX)
        for raw_holder in client.hkeys(raw_key):
            found += check_reference(base, text(raw_holder, "replace"), world, files)
    return found


def check_reference(
    base: str, holder: str, world: World, files: dict[str, DiskFile]
) -> list[Violation]:
    if holder.startswith("pending/"):
        return [Violation("no-pending-left", f"reference {holder} to {base} is left")]
    disk = files.get(holder)
    entry = world.cache_dir / base
    if disk is None:
        return [Violation("no-dangling-reference", f"{holder} references {base} without a disk")]
    found = []
    if disk.backing != str(entry):
        found.append(
            Violation(
                "no-dangling-reference",
                f"{holder} references {base} but its backing file is {disk.backing}",
            )
        )
    if not entry.is_file():
        found.append(Violation("no-base-in-use-evicted", f"{holder} references {base}: gone"))
    return found


# -- instance disks ------------------------------------------------------------------------------


def disk_files(world: World) -> dict[str, DiskFile]:
    """Every file of every instance directory that is neither a record nor a temporary."""
    found = {}
    for host in world.hosts.values():
        if not host.instances_dir.exists():
            continue
        for instance in sorted(host.instances_dir.iterdir()):
            formats = _formats(instance)
            for path in sorted(instance.iterdir()):
                if path.name == DISK_INFO or TEMPORARY.search(path.name):
                    continue
                fmt = formats.get(path.name)
                backing = _backing(path) if fmt == "qcow2" else None
                name = f"{host.id}/{instance.name}/{path.name}"
                found[name] = DiskFile(host.id, instance.name, path.name, path, fmt, backing)
    return found


def _formats(instance: Path) -> dict[str, str]:
    try:
        data = json.loads((instance / DISK_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _info(path: Path, fmt: str) -> dict[str, Any]:
    shown = subprocess.run(
        ["qemu-img", "info", "-U", "-f", fmt, "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return dict(json.loads(shown.stdout)) if shown.returncode == 0 else {}


def _backing(path: Path) -> str | None:
    value = _info(path, "qcow2").get("backing-filename")
    return str(value) if value else None


def check_instances(world: World, files: dict[str, DiskFile]) -> list[Violation]:
    found = []
    for host in world.hosts.values():
        for directory in (host.instances_dir, host.snapshots_dir):
            for path in sorted(directory.rglob("*")):
                if TEMPORARY.search(path.name):
                    found.append(Violation("no-temporary", f"temporary file {path} is left"))
        workdirs = host.state_dir / "devices"  # tasks/guest.py: one per mounted disk
        if workdirs.is_dir():
            found += [
                Violation("no-mount-left", f"device work directory {path} is left")
                for path in sorted(workdirs.iterdir())
            ]
    for name, disk in sorted(files.items()):
        if disk.format is None:
            found.append(Violation("disk-record", f"disk {name} has no format in disk.info"))
        elif disk.format == "qcow2":
            if disk.backing is None:
                found.append(Violation("backing-file", f"qcow2 disk {name} has no backing file"))
            elif not Path(disk.backing).is_file():
                found.append(
                    Violation(
                        "no-base-in-use-evicted",
                        f"disk {name} has backing file {disk.backing}, which is gone",
                    )
                )
    return found


def check_model(
    disks: list[Disk], files: dict[str, DiskFile], client: redis.Redis, world: World
) -> list[Violation]:
    """What the client knows of each disk against what is on disk."""
    found = []
    sampled = 0
    for disk in disks:
        if disk.backend == "rbd":
            continue  # in Ceph, not a file: bench.chaos.rbd_state
        actual = files.get(disk.name)
        if disk.state == "absent" and actual is not None:
            found.append(
                Violation("deleted-disk-gone", f"{disk.name} exists although its delete succeeded")
            )
        if disk.state != "present" or disk.prepared is None:
            continue
        if actual is None:
            found.append(
                Violation(
                    "prepared-disk-exists",
                    f"{disk.name}, made by a successful prepare and never deleted, is gone",
                )
            )
            continue
        found += _compare(disk, actual, client)
        if disk.injected and sampled < INJECTED_SAMPLE:
            sampled += 1
            found += _check_injected(disk, actual, world)
    return found


def _compare(disk: Disk, actual: DiskFile, client: redis.Redis) -> list[Violation]:
    assert disk.prepared is not None
    found = []
    if actual.format != disk.backend:
        found.append(
            Violation(
                "prepared-disk-exists",
                f"{disk.name} is recorded as {actual.format}, prepared as {disk.backend}",
            )
        )
        return found
    size = _info(actual.path, disk.backend).get("virtual-size")
    if size != disk.size:
        found.append(
            Violation("prepared-disk-exists", f"{disk.name} has {size} bytes, not {disk.size}")
        )
    if disk.backend == "qcow2":
        base = disk.prepared["base"]
        if actual.backing != base["path"]:
            found.append(
                Violation(
                    "backing-file",
                    f"{disk.name} has backing file {actual.backing}, prepared on {base['path']}",
                )
            )
        if not client.hexists(REFS_PREFIX + base["key"], disk.name):
            found.append(
                Violation(
                    "disk-referenced",
                    f"{disk.name} uses {base['key']} but is not among its references: another "
                    "host's cache manager may evict it",
                )
            )
    return found


def _check_injected(disk: Disk, actual: DiskFile, world: World) -> list[Violation]:
    assert disk.prepared is not None
    guest = disk.prepared.get("guest") or {}
    found = []
    for path, content in disk.injected.items():
        read = read_guest_file(
            actual.path, disk.backend, guest.get("partition"), path, world.cache_dir.parent
        )
        if read is None or read.content != content or read.mode & 0o7777 != 0o600:
            found.append(
                Violation(
                    "injected-file",
                    f"{disk.name}: {path} reads {read!r}, injected {content!r} mode 0600",
                )
            )
    return found


def check_hostile(history: History, files: dict[str, DiskFile]) -> list[Violation]:
    """A request that had to fail made no disk, and wrote no file where it pointed."""
    made = {f.instance for f in files.values()}
    return [
        *(
            Violation("hostile-refused", f"{op.describe()} left a disk of {op.context['instance']}")
            for op in history.ops
            if "expect" in op.context and op.context.get("instance") in made
        ),
        *(
            Violation("hostile-refused", f"{op.describe()} wrote {op.context['must_not_exist']}")
            for op in history.ops
            if "must_not_exist" in op.context and Path(op.context["must_not_exist"]).exists()
        ),
    ]


def check_snapshots(history: History, world: World) -> list[Violation]:
    found = []
    for op in history.ops:
        if op.kind != "snapshot" or op.outcome != "ok" or not op.result:
            continue
        if op.request.get("method") == "direct":
            continue  # an image in Ceph: bench.chaos.rbd_state
        path = Path(op.result["path"])
        host = world.hosts[op.request["host"]]
        if not path.is_relative_to(host.snapshots_dir):
            found.append(
                Violation("snapshot", f"{op.describe()} wrote outside {host.snapshots_dir}")
            )
        elif not path.is_file():
            found.append(Violation("snapshot", f"{op.describe()}: {path} is gone"))
        elif sha256_file(path) != op.result["sha256"]:
            found.append(Violation("snapshot", f"{op.describe()}: {path} has another sha256"))
    return found


def check_machine(root: Path) -> list[Violation]:
    return [
        *(Violation("no-mount-left", f"mount {m}") for m in machine.mounts_under(root)),
        *(
            Violation("no-loop-left", f"loop device {d}")
            for d in machine.loop_devices_backed_by(root)
        ),
        *(
            Violation("no-daemon-left", f"daemon pid {p}")
            for p in machine.processes_mentioning(root)
        ),
    ]
