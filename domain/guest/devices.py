"""How an instance disk is exposed on this host: strategies chosen by what the host can do.

Two layers, each an interface with the strategies that run here:

* a **disk view** makes the whole disk readable and writable as raw bytes at a path:
  `FileView` for a raw disk (the file itself), `StorageDaemonView` for a qcow2 overlay
  (qemu-storage-daemon's FUSE export; writes land in the overlay, the base is opened read-only),
  `RbdView` for an RBD clone (the same daemon's rbd driver; writes land in the clone);
* a **partition device** exposes one byte range of a view as a block device, for a kernel
  mount: `LoopPartition` (`losetup -o OFFSET --sizelimit SIZE`).

Hosts with nbd (`qemu-nbd -c`) or device-mapper (kpartx) can get strategies of their own by
adding a class to VIEWS or PARTITION_DEVICES with its capability check; only strategies that run
here exist, so each one is tested for real. Every strategy notes its resource in the ledger
before it creates it, and reuses what an earlier attempt of the same operation left in place.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from domain.core.errors import DeviceError, NoFreeDevice
from domain.core.models import InstanceDisk
from domain.core.runner import CommandError
from domain.disks.device_records import LoopDevice, StorageDaemon
from domain.guest.context import Claim, DeviceContext, WorkArea
from domain.guest.tools import daemons, losetup, storage_daemon
from domain.guest.tools import mount as mounts

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class HostCapabilities:
    """What this host offers for exposing disks."""

    loop: bool
    fuse: bool
    storage_daemon: bool
    fuse2fs: bool

    @classmethod
    def probe(cls, path: str | None = None) -> HostCapabilities:
        return cls(
            loop=Path("/dev/loop-control").exists(),
            fuse=Path("/dev/fuse").exists(),
            storage_daemon=shutil.which(storage_daemon.STORAGE_DAEMON, path=path) is not None,
            fuse2fs=shutil.which("fuse2fs", path=path) is not None,
        )


@functools.cache
def host_capabilities() -> HostCapabilities:
    """This host's capabilities, probed once per process."""
    return HostCapabilities.probe()


# -- disk views ------------------------------------------------------------------------------------


class DiskView(Protocol):
    """Makes a whole instance disk available as raw bytes at a path."""

    name: str

    def supports(self, disk_format: str, host: HostCapabilities) -> bool: ...

    def path(self, disk: InstanceDisk, area: WorkArea) -> Path:
        """Where this strategy exposes `disk`: later steps check the view they are handed."""
        ...

    def attach(
        self, disk: InstanceDisk, area: WorkArea, claim: Claim, ctx: DeviceContext
    ) -> Path: ...


class FileView:
    """A raw disk is its own raw view: nothing to create."""

    name = "file"

    def supports(self, disk_format: str, host: HostCapabilities) -> bool:
        return disk_format == "raw"

    def path(self, disk: InstanceDisk, area: WorkArea) -> Path:
        return Path(disk.path)

    def attach(self, disk: InstanceDisk, area: WorkArea, claim: Claim, ctx: DeviceContext) -> Path:
        return Path(disk.path)


class StorageDaemonView:
    """A qcow2 overlay exported as a raw file by qemu-storage-daemon over FUSE."""

    name = "storage-daemon"

    def supports(self, disk_format: str, host: HostCapabilities) -> bool:
        return disk_format == "qcow2" and host.fuse and host.storage_daemon

    def path(self, disk: InstanceDisk, area: WorkArea) -> Path:
        return area.export

    def attach(self, disk: InstanceDisk, area: WorkArea, claim: Claim, ctx: DeviceContext) -> Path:
        if _still_exported(area.export, ctx):
            return area.export
        return _start_export(
            area,
            claim,
            lambda: ctx.ops.start_storage_daemon(
                Path(disk.path),
                backing=Path(disk.backing_file) if disk.backing_file else None,
                backing_format=disk.backing_format,
                export=area.export,
                pidfile=area.pidfile,
            ),
            # e.g. a running VM holds the overlay's write lock
            failure=f"cannot export {disk.instance_id}/{disk.disk_name} with qemu-storage-daemon",
        )


class RbdView:
    """An RBD clone exported as a raw file by qemu-storage-daemon's rbd driver over FUSE: the
    daemon talks to the cluster as the workers' cephx user; writes land in the clone, never in
    its parent (a protected snapshot, read-only to every client)."""

    name = "rbd"

    def supports(self, disk_format: str, host: HostCapabilities) -> bool:
        return disk_format == "raw" and host.fuse and host.storage_daemon

    def path(self, disk: InstanceDisk, area: WorkArea) -> Path:
        return area.export

    def attach(self, disk: InstanceDisk, area: WorkArea, claim: Claim, ctx: DeviceContext) -> Path:
        if _still_exported(area.export, ctx):
            return area.export
        ceph = ctx.ceph
        if ceph is None:
            raise DeviceError("this worker has no Ceph cluster configured (rbd.conf)")
        pool, image = disk.path.removeprefix("rbd:").split("/", 1)
        return _start_export(
            area,
            claim,
            lambda: ctx.ops.start_rbd_export(
                pool=pool,
                image=image,
                conf=ceph.conf,
                user=ceph.user,
                keyring=ceph.keyring,
                export=area.export,
                pidfile=area.pidfile,
            ),
            failure=f"cannot export {disk.path} with qemu-storage-daemon",
            image=disk.path,
        )


def _still_exported(export: Path, ctx: DeviceContext) -> bool:
    """Whether a qemu-storage-daemon an earlier attempt of this operation started still serves
    `export`; a dead daemon's mount is removed."""
    if mounts.is_mounted(export):
        if daemons.find(storage_daemon.STORAGE_DAEMON, export):
            return True
        ctx.ops.unmount(export)  # the daemon died: its export is a dead mount
    return False


def _start_export(
    area: WorkArea, claim: Claim, start: Callable[[], None], *, failure: str, **shown: str
) -> Path:
    """Record the daemon in the disk's ledger record, then `start` it: the export of `area`."""
    claim.note(StorageDaemon(export=str(area.export), pidfile=str(area.pidfile)))
    started = time.monotonic()
    try:
        start()
    except CommandError as error:
        raise DeviceError(f"{failure}: {error}") from None
    log.info(
        "storage_daemon_started",
        export=str(area.export),
        **shown,
        seconds=round(time.monotonic() - started, 4),
    )
    return area.export


VIEWS: tuple[DiskView, ...] = (FileView(), StorageDaemonView())


def choose_view(disk_format: str, host: HostCapabilities, backend: str | None = None) -> DiskView:
    """The view of a disk of `disk_format` (of `backend`: "rbd" for a clone in Ceph)."""
    if backend == "rbd":
        if RbdView().supports(disk_format, host):
            return RbdView()
        raise DeviceError(
            "this host cannot expose an rbd disk: it needs qemu-storage-daemon "
            "(with qemu-block-extra's rbd driver) and /dev/fuse"
        )
    for view in VIEWS:
        if view.supports(disk_format, host):
            return view
    needs = {"qcow2": "qemu-storage-daemon and /dev/fuse"}.get(disk_format, "a strategy")
    raise DeviceError(f"this host cannot expose a {disk_format} disk: it needs {needs}")


# -- partition devices -----------------------------------------------------------------------------


class PartitionDevice(Protocol):
    """Exposes `size` bytes of a raw view from `offset` as a block device."""

    name: str

    def supports(self, host: HostCapabilities) -> bool: ...

    def attach(
        self, view: Path, offset: int, size: int, claim: Claim, ctx: DeviceContext
    ) -> str: ...


class LoopPartition:
    """One loop device per partition, with its offset and size limit."""

    name = "loop"

    def supports(self, host: HostCapabilities) -> bool:
        return host.loop

    def attach(self, view: Path, offset: int, size: int, claim: Claim, ctx: DeviceContext) -> str:
        for existing in losetup.backed_by(ctx.runner, view, offset):
            if existing.sizelimit == size:
                claim.note(
                    LoopDevice(backing=str(view), offset=offset, size=size, device=existing.name)
                )
                return existing.name
        claim.note(LoopDevice(backing=str(view), offset=offset, size=size))
        device = allocate(
            lambda: ctx.ops.attach_loop(view, offset=offset, size=size),
            ctx.policy.device_wait_seconds,
        )
        claim.note(LoopDevice(backing=str(view), offset=offset, size=size, device=device))
        log.info("loop_device_attached", device=device, offset=offset, size=size)
        return device


PARTITION_DEVICES: tuple[PartitionDevice, ...] = (LoopPartition(),)


def choose_partition_device(host: HostCapabilities) -> PartitionDevice:
    for device in PARTITION_DEVICES:
        if device.supports(host):
            return device
    raise DeviceError("this host has no way to make a block device of a partition (no loop)")


def allocate(attempt: Callable[[], str], wait_seconds: float, pause: float = 2.0) -> str:
    """Call `attempt` until it gets a device or `wait_seconds` pass (Nova's MAX_DEVICE_WAIT):
    NoFreeDevice after the wait, which the step retries later with backoff."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return attempt()
        except NoFreeDevice:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log.info("device_allocation_retried", seconds_left=round(left, 1))
            time.sleep(min(pause, left))


def is_live_mount(path: Path, ctx: DeviceContext) -> bool:
    """Mounted and answering: a FUSE mount whose daemon died fails statvfs with ENOTCONN (asked
    of the privileged side: a FUSE mount answers only the user that mounted it)."""
    return mounts.is_mounted(path) and ctx.ops.is_live_mount(path)
