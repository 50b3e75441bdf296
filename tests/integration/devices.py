"""Helpers of the device tests: instance disks made directly, device steps sent as chains,
and what is left of a disk's devices on the machine and in Redis."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Signature, chain
from celery.result import AsyncResult

from domain.cache.directory import CacheRecord, cache_key
from domain.core.models import (
    CachedImage,
    DiskSpec,
    FileInjection,
    ImageSource,
    InstanceDisk,
    PreparedDisk,
    PrepareRequest,
)
from domain.core.publish import FileStamp
from domain.guest.tools import mount as mounts
from tasks.canvases import injection_steps, with_ids
from tests.conftest import need_root, unable
from tests.integration.conftest import Cluster, unique
from tests.support.guests import build_guest
from worker.stores.replies import text

MOTD = FileInjection(path="/etc/motd", content="Welcome to the guest.\n", mode=0o640)


def need_devices() -> None:
    need_root()
    if not Path("/dev/fuse").exists():
        unable("needs /dev/fuse for fuse2fs and qemu-storage-daemon exports")


@dataclass(frozen=True)
class DirectDisk:
    """An instance disk a test made itself (raw, or a qcow2 overlay on a raw base)."""

    prepared: PreparedDisk
    request: PrepareRequest
    offset: int

    @property
    def key(self) -> str:
        return f"{self.request.disk.instance_id}/disk"

    def remove(self) -> None:
        disk = Path(self.prepared.disk.path)
        disk.unlink()
        (disk.parent / "disk.info").unlink()
        disk.parent.rmdir()
        if self.prepared.disk.backing_file:
            backing = Path(self.prepared.disk.backing_file)
            backing.unlink()
            backing.with_name(backing.name + ".json").unlink()


def cache_entry(cluster: Cluster, image_id: str, layout: str) -> tuple[Path, int]:
    """A guest disk made into a cache entry with the record imgprep would write beside it: the
    device steps take a backing file only if it is a complete entry. Its path and offset."""
    key = cache_key(image_id)
    entry = cluster.settings.cache_dir / key
    offset = build_guest(entry, layout).offset
    size = entry.stat().st_size
    image = CachedImage(
        key=key,
        image_id=image_id,
        path=str(entry),
        format="raw",
        virtual_size=size,
        source_sha256="0" * 64,
    )
    record = CacheRecord(
        image=image,
        source="direct",
        source_format="raw",
        source_bytes=size,
        fence=0,
        fetched_at=datetime.now(UTC),
        file=FileStamp.of(entry),
    )
    entry.with_name(key + ".json").write_text(record.model_dump_json())
    cluster.give_to_workers(entry, entry.with_name(key + ".json"))
    return entry, offset


def direct_disk(
    cluster: Cluster, fmt: str, *, layout: str = "mbr", host: str | None = None
) -> DirectDisk:
    """An instance disk made without prepare_disk: a raw guest disk, or a qcow2 overlay on one,
    with its format recorded in disk.info as imgprep records it (the device steps check it)."""
    instance = unique("vm")
    folder = cluster.settings.instances_dir / instance
    folder.mkdir()
    path = folder / "disk"
    backing = None
    if fmt == "raw":
        offset = build_guest(path, layout).offset
        size = path.stat().st_size
    else:
        backing, offset = cache_entry(cluster, unique("base"), layout)
        size = 64 * 2**20
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing)]
        subprocess.run([*create, str(path), str(size)], check=True)
    (folder / "disk.info").write_text(json.dumps({"disk": fmt}))
    cluster.give_to_workers(folder, path, folder / "disk.info")
    disk = InstanceDisk(
        host=host or cluster.settings.host_id,
        instance_id=instance,
        disk_name="disk",
        path=str(path),
        format="raw" if fmt == "raw" else "qcow2",
        virtual_size=size,
        backing_file=str(backing) if backing else None,
        backing_format="raw" if backing else None,
    )
    base = CachedImage(
        key="direct",
        image_id="direct",
        path=str(backing or path),
        format="raw",
        virtual_size=size,
        source_sha256="",
    )
    request = PrepareRequest(
        image=ImageSource(url="http://unused.invalid/", image_id="direct"),
        disk=DiskSpec(instance_id=instance, size_bytes=size),
        inject=(MOTD,),
        host=host,
    )
    return DirectDisk(PreparedDisk(disk=disk, base=base), request, offset)


def device_steps(
    disk: DirectDisk, operation: str, *, host: str, upto: str | None = None
) -> list[Signature]:
    """prepare_disk's device steps for `disk` (map, mount, inject, teardown), the first one
    given the prepared disk; cut after the step named `upto`."""
    steps = injection_steps(disk.request, host=host, operation=operation)
    steps[0] = steps[0].clone(args=(disk.prepared.model_dump(mode="json"),))
    if upto is not None:
        names = [step.task for step in steps]
        steps = steps[: names.index(upto) + 1]
    return steps


def send(cluster: Cluster, steps: list[Signature], final_id: str) -> AsyncResult:
    """Send `steps` as a chain through the cluster's broker, the last one under `final_id`."""
    bound = [cluster.app.signature(dict(step)) for step in steps]
    chain(*with_ids(bound, final_id).tasks, app=cluster.app).apply_async()
    return cluster.app.AsyncResult(final_id)


def step_states(cluster: Cluster, operation: str) -> list[tuple[str, str]]:
    """Each planned step of an operation and its state in the result backend."""
    view = cluster.journal.read(operation)
    assert view is not None
    return [
        (step.name.removeprefix("imgprep."), cluster.app.AsyncResult(step.task_id).state)
        for step in view.plan
    ]


def device_records(cluster: Cluster) -> dict[str, dict[Any, Any]]:
    client = cluster.redis
    return {text(key): client.hgetall(key) for key in client.scan_iter(match="imgprep:devices:*")}


def mount_dir(cluster: Cluster, key: str) -> Path:
    return cluster.settings.devices_dir / key / "root"


def is_mounted(path: Path) -> bool:
    return mounts.is_mounted(path)


def assert_released(cluster: Cluster, instance: str) -> None:
    """Nothing of the disk's devices is left: record, work directory, mounts, loops, daemons."""
    assert device_records(cluster) == {}
    assert not (cluster.settings.devices_dir / instance).exists()
    cluster.assert_clean()
