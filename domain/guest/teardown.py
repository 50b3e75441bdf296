"""teardown and release_devices: release what the ledger says exists for a disk, in reverse
order, from any state.

Nova's do_teardown (unmount, unmap, release the device), rebuilt around the resource ledger:
each resource is released only if it is still there (a mount that is mounted, a loop device
still over our file, a daemon still running), dropped from the record once released, and the
record is dropped last. Running it twice, after a partial run, or after a crash at any point of
the device steps, ends in the same place: nothing mounted, attached or running, no record.

* mount: unmount; for fuse2fs, wait for the daemon to exit, which is when the guest filesystem
  is written back (killed after `mount.stop_timeout_seconds`, and then reported);
* loop device: detach every loop device over the view at the partition's offset;
* storage daemon: SIGTERM (it unmounts its export and exits), SIGKILL after the timeout, and
  unmount the export if the daemon died without doing so;
* work directory: remove the mount point, export file and pid file — only once nothing is
  mounted on them — and the directory itself (the privileged side does: with the helper, work
  areas are in root's tree).

A mount still in use is DeviceBusy (transient): the step retries and the record stays.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from domain.core.errors import DeviceBusy, DeviceError
from domain.core.models import GuestFilesystem, PreparedDisk
from domain.disks.device_records import (
    DeviceRecord,
    LoopDevice,
    Mount,
    Resource,
    StorageDaemon,
    WorkDir,
)
from domain.guest.context import Claim, DeviceContext, InjectedDisk
from domain.guest.tools import daemons, fuse2fs, losetup, storage_daemon
from domain.guest.tools import mount as mounts

log = structlog.get_logger(__name__)


def teardown(done: InjectedDisk, disk: str, ctx: DeviceContext) -> PreparedDisk:
    """The last step of an injection: release the devices of `disk`, and answer with the
    prepared disk, the guest filesystem the files went into and the files written."""
    release_devices(disk, ctx)
    mapped = done.mounted.mapped
    guest = GuestFilesystem(
        partition=mapped.partition.number, filesystem=mapped.filesystem, mount=mapped.method
    )
    prepared = mapped.prepared.model_copy(update={"guest": guest, "injected": done.files})
    return PreparedDisk.model_validate(prepared.model_dump())


def release_devices(disk: str, ctx: DeviceContext, *, any_owner: bool = False) -> bool:
    """Release the devices of `disk` held by this operation (or by anyone, for the janitor).

    Returns whether there was anything to release."""
    record = ctx.ledger.get(disk)
    if record is None or (record.owner != ctx.owner and not any_owner):
        return False
    with ctx.locks(ctx.lock_name(disk)):
        record = ctx.ledger.get(disk)
        if record is None or (record.owner != ctx.owner and not any_owner):
            return False
        release_record(record, ctx)
    return True


def release_record(record: DeviceRecord, ctx: DeviceContext) -> None:
    """Release every resource of `record`, newest first, then drop the record."""
    claim = Claim(ctx.ledger, record)
    problems: list[str] = []
    for resource in reversed(record.resources):
        problem = release(resource, ctx)
        if problem:
            problems.append(problem)
        claim.forget(resource)
    ctx.ledger.drop(record.disk, record.owner)
    log.info(
        "devices_released",
        disk=record.disk,
        owner=record.owner,
        resources=[r.kind for r in record.resources],
    )
    if problems:
        raise DeviceError(f"devices of {record.disk} released with problems: {'; '.join(problems)}")


def release(resource: Resource, ctx: DeviceContext) -> str | None:
    """Release one resource if it is still there; a problem worth reporting, or None."""
    if isinstance(resource, Mount):
        return _release_mount(resource, ctx)
    if isinstance(resource, LoopDevice):
        _release_loop(resource, ctx)
    elif isinstance(resource, StorageDaemon):
        return _release_storage_daemon(resource, ctx)
    elif isinstance(resource, WorkDir):
        _release_workdir(resource, ctx)
    return None


def _release_mount(resource: Mount, ctx: DeviceContext) -> str | None:
    target = Path(resource.mount_dir)
    pids = daemons.find(fuse2fs.FUSE2FS, target) if resource.method == "fuse2fs" else []
    if mounts.is_mounted(target):
        ctx.ops.unmount(target)
        log.info("guest_unmounted", mount_dir=str(target), method=resource.method)
    if pids and daemons.wait_gone(pids, ctx.policy.stop_timeout_seconds):
        ctx.ops.kill_daemons(fuse2fs.FUSE2FS, target)
        return (
            f"fuse2fs did not exit within {ctx.policy.stop_timeout_seconds:.0f} s of the unmount "
            "and was killed; files written to the guest may be incomplete"
        )
    return None


def _release_loop(resource: LoopDevice, ctx: DeviceContext) -> None:
    for device in losetup.backed_by(ctx.runner, Path(resource.backing), resource.offset):
        ctx.ops.detach_loop(device.name)
        log.info("loop_device_detached", device=device.name)


def _release_storage_daemon(resource: StorageDaemon, ctx: DeviceContext) -> str | None:
    export = Path(resource.export)
    pids = daemons.find(storage_daemon.STORAGE_DAEMON, export)
    problem = None
    if pids:
        timeout = ctx.policy.stop_timeout_seconds
        if ctx.ops.stop_daemons(storage_daemon.STORAGE_DAEMON, export, timeout=timeout):
            problem = (
                f"qemu-storage-daemon did not stop within {ctx.policy.stop_timeout_seconds:.0f} s "
                "and was killed; writes to the overlay may be incomplete"
            )
        log.info("storage_daemon_stopped", export=str(export), pids=pids)
    if mounts.is_mounted(export):  # the daemon died without unmounting its export
        ctx.ops.unmount(export)
    return problem  # its pid file goes with the work area


def _release_workdir(resource: WorkDir, ctx: DeviceContext) -> None:
    path = Path(resource.path)
    if not path.exists():  # never made (the step failed before), or removed already
        return
    for name in ("root", "export"):
        entry = path / name
        if mounts.is_mounted(entry):
            raise DeviceBusy(f"{entry} is still mounted; its release is retried")
    if not ctx.ops.remove_work_area(path):  # something imgprep did not put there
        log.warning("workdir_not_removed", path=str(path), error="not empty")
