"""What the device steps hand each other, and what they need from the runtime.

map_partitions → MappedDisk → mount_guest → MountedDisk → inject_files → InjectedDisk →
teardown → PreparedDisk. Each model carries the one before it, so the last step can answer with
the whole story; all of them are JSON on the wire like every other step result.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Protocol

from domain.cache.directory import ImageCache
from domain.core import diskinfo
from domain.core.errors import DeviceError, InvalidRequest
from domain.core.models import FROM_JSON_ARRAY, InjectedFile, InstanceDisk, PreparedDisk, WireModel
from domain.core.paths import child, lexical_child
from domain.core.ports import LockFactory
from domain.core.runner import Runner
from domain.disks.device_records import DeviceRecord, Resource
from domain.disks.ports import DeviceLedger
from domain.guest.ports import PrivilegedOperations
from domain.guest.privileged import InProcessPrivileged
from domain.rbd.tool import CephAccess

MountMethod = Literal["fuse2fs", "kernel"]
KernelMount = Literal["never", "fallback", "always"]


class GuestPartition(WireModel):
    """The byte range of the guest disk that holds the filesystem."""

    table: Literal["none", "mbr", "gpt"]
    number: int | None  # None: the whole disk
    offset: int
    size: int


class MappedDisk(WireModel):
    """The disk as raw bytes at `view`, its filesystem found and a way to mount it chosen."""

    kind: Literal["mapped_disk"] = "mapped_disk"
    prepared: PreparedDisk
    view: str
    partition: GuestPartition
    filesystem: str
    method: MountMethod
    device: str | None = None  # the partition's block device, for a kernel mount


class MountedDisk(WireModel):
    kind: Literal["mounted_disk"] = "mounted_disk"
    mapped: MappedDisk
    mount_dir: str


class InjectedDisk(WireModel):
    kind: Literal["injected_disk"] = "injected_disk"
    mounted: MountedDisk
    files: Annotated[tuple[InjectedFile, ...], FROM_JSON_ARRAY]


class MountPolicy(Protocol):
    """How guests may be mounted (worker.settings.MountSettings satisfies it)."""

    @property
    def allowed_filesystems(self) -> tuple[str, ...]: ...
    @property
    def kernel_mount(self) -> KernelMount: ...
    @property
    def device_wait_seconds(self) -> float: ...
    @property
    def stop_timeout_seconds(self) -> float: ...


def disk_key(disk: InstanceDisk) -> str:
    """`<instance_id>/<disk_name>`: how the ledger and the locks name an instance disk."""
    return f"{disk.instance_id}/{disk.disk_name}"


def check_disk(disk: InstanceDisk, ctx: DeviceContext) -> None:
    """Refuse a disk that is not where imgprep puts instance disks, or is not a plain file, or
    whose format is not the one its disk.info records, or whose backing file is not a complete
    cache entry in the format its record names: step inputs travel through the broker, and
    these paths and formats are handed to tools that run as root (a raw disk opened as qcow2
    would follow whatever header the guest wrote)."""
    check_disk_words(disk, ctx)
    if disk.backend == "rbd":
        return  # a clone in Ceph: no file here; the export fails if it is not in the cluster
    expected = child(child(ctx.instances_dir, disk.instance_id), disk.disk_name)
    try:
        mode = expected.lstat().st_mode
    except FileNotFoundError:
        raise DeviceError(f"the instance disk {expected} does not exist") from None
    if not stat.S_ISREG(mode):
        raise InvalidRequest(f"{expected} is not a regular file")
    recorded = diskinfo.read_format(expected.parent, expected.name)
    if recorded != disk.format:
        raise InvalidRequest(
            f"{expected} is recorded as {recorded or 'no disk of imgprep'}, not {disk.format}"
        )
    if disk.backing_file is not None:
        _check_backing(disk, ctx)


def check_disk_words(disk: InstanceDisk, ctx: DeviceContext) -> None:
    """`check_disk`'s lexical half: the disk's path is where imgprep puts that instance disk,
    its backing file names an entry of the cache (reads nothing on the machine); an rbd disk is
    the clone `<pool>/<instance>_<disk>` of this worker's cluster, raw."""
    if disk.backend == "rbd":
        _check_rbd_words(disk, ctx)
        return
    expected = lexical_child(lexical_child(ctx.instances_dir, disk.instance_id), disk.disk_name)
    if Path(disk.path) != expected:
        raise InvalidRequest(f"disk path {disk.path} is not the instance disk path {expected}")
    if disk.backing_file is not None:
        backing = Path(disk.backing_file)
        if disk.format != "qcow2" or backing != lexical_child(ctx.cache_dir, backing.name):
            raise InvalidRequest(f"backing file {backing} is not an entry of the image cache")


def _check_rbd_words(disk: InstanceDisk, ctx: DeviceContext) -> None:
    if ctx.ceph is None:
        raise InvalidRequest(f"{disk.path} is an rbd disk, and this worker has no Ceph cluster")
    expected = f"rbd:{ctx.ceph.pool}/{disk.instance_id}_{disk.disk_name}"
    if disk.path != expected or disk.format != "raw":
        raise InvalidRequest(
            f"rbd disk {disk.path} ({disk.format}) is not the raw clone {expected}"
        )


def _check_backing(disk: InstanceDisk, ctx: DeviceContext) -> None:
    backing = Path(str(disk.backing_file))
    base = ImageCache(ctx.cache_dir).image(backing.name)
    if base is None or base.format != disk.backing_format:
        raise InvalidRequest(
            f"backing file {backing} is not a complete cache entry in {disk.backing_format} format"
        )


@dataclass(frozen=True)
class DeviceContext:
    """The collaborators and identity every device step works with."""

    runner: Runner
    ledger: DeviceLedger
    locks: LockFactory
    policy: MountPolicy
    state_dir: Path
    instances_dir: Path
    cache_dir: Path
    host: str
    owner: str  # the operation: the caller's task id
    worker: str  # this worker's node name
    # loop devices, mounts, FUSE daemons, root-owned guest files; None: in this process
    privileged: PrivilegedOperations | None = None
    # the device work areas (worker.settings.Settings.devices_dir); None: <state_dir>/devices
    devices_dir: Path | None = None
    # this host's Ceph cluster (rbd.*), for rbd disks; None: none configured
    ceph: CephAccess | None = None

    @property
    def ops(self) -> PrivilegedOperations:
        """The privileged operations: the helper's client, or this process's own."""
        return self.privileged or InProcessPrivileged(self.runner)

    def lock_name(self, disk: str) -> str:
        return f"devices:{self.host}:{disk}"

    def work_area(self, disk: str) -> WorkArea:
        instance, name = disk.split("/", 1)
        devices = self.devices_dir or self.state_dir / "devices"
        return WorkArea(child(child(devices, instance), name))


@dataclass(frozen=True)
class WorkArea:
    """The private directory of one instance disk's devices: mount point, export file, pid file."""

    path: Path

    @property
    def mount_dir(self) -> Path:
        return self.path / "root"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def pidfile(self) -> Path:
        return self.path / "storage-daemon.pid"


class Claim:
    """An operation's hold on one disk's record: notes resources before they are created."""

    def __init__(self, ledger: DeviceLedger, record: DeviceRecord) -> None:
        self.ledger = ledger
        self.record = record

    @classmethod
    def take(cls, ctx: DeviceContext, disk: str) -> Claim:
        """Claim `disk` for this operation (DiskBusy when another holds it)."""
        return cls(ctx.ledger, ctx.ledger.claim(disk, ctx.owner, ctx.worker))

    @classmethod
    def resume(cls, ctx: DeviceContext, disk: str) -> Claim:
        """The claim an earlier step of this operation made; DeviceError if it is gone."""
        record = ctx.ledger.get(disk)
        if record is None or record.owner != ctx.owner:
            raise DeviceError(
                f"the devices of {disk} were released before this step ran (a worker restarted "
                "and its janitor released them, or another operation took the disk); prepare "
                "the disk again"
            )
        claim = cls(ctx.ledger, record.model_copy(update={"worker": ctx.worker}))
        ctx.ledger.put(claim.record)
        return claim

    def note(self, resource: Resource) -> None:
        """Record `resource` (before creating it, or to add what was learnt after)."""
        self.record = self.record.with_resource(resource)
        self.ledger.put(self.record)

    def forget(self, resource: Resource) -> None:
        """Drop `resource` from the record once it has been released."""
        self.record = self.record.without(resource)
        self.ledger.put(self.record)
