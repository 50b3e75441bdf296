"""Mounting the guest filesystem on a private directory, userspace first.

Guest filesystems are untrusted input to whatever parses them, and the host kernel's
filesystem drivers are the worst place to parse them (libguestfs' security guide). So:

* the filesystem type is detected with `blkid -p` on the partition's byte range and checked
  against the allow-list (`mount.allowed_filesystems`);
* ext2/3/4 are mounted by fuse2fs, a userspace process, straight from the raw view with
  `-o offset=` — after checking that the filesystem's own idea of its size fits in the
  partition, since fuse2fs has no size limit, and that its journal needs no recovery (fuse2fs
  cannot replay a journal: it refuses such a filesystem, or crashes on it, leaving a dead
  mount);
* a kernel mount (nosuid, nodev, noexec) of the partition's loop device is used only when
  `mount.kernel_mount` says so: `fallback` for filesystems without a userspace driver,
  `always` for every filesystem.
"""

from __future__ import annotations

import struct
from pathlib import Path

import structlog

from domain.core.errors import FilesystemNeedsRecovery, FilesystemRefused, InvalidRequest
from domain.core.runner import CommandError, Runner
from domain.disks.device_records import LoopDevice, Mount
from domain.guest.context import (
    Claim,
    DeviceContext,
    MappedDisk,
    MountedDisk,
    MountMethod,
    MountPolicy,
    WorkArea,
    check_disk,
    check_disk_words,
    disk_key,
)
from domain.guest.devices import choose_view, host_capabilities, is_live_mount
from domain.guest.tools import fuse2fs
from domain.guest.tools import mount as mounts

log = structlog.get_logger(__name__)

EXT_MAGIC = 0xEF53
EXT_INCOMPAT_RECOVER = 0x4  # "needs_recovery": the journal holds transactions not yet replayed
EXT_INCOMPAT_64BIT = 0x80


def detect_filesystem(
    runner: Runner, view: Path, *, offset: int, size: int, where: str, policy: MountPolicy
) -> str:
    """The filesystem type at `offset` of `view`, if the allow-list has it."""
    status, fields = mounts.probe(runner, view, offset=offset, size=size)
    if status == mounts.AMBIVALENT:
        raise FilesystemRefused(
            f"{where} carries signatures of more than one filesystem; refusing to guess"
        )
    fstype = fields.get("TYPE")
    if status == mounts.NOTHING_FOUND or not fstype or fields.get("USAGE") != "filesystem":
        found = f" (blkid sees {fstype})" if fstype else ""
        raise FilesystemRefused(f"{where} holds no filesystem imgprep knows{found}")
    if fstype not in policy.allowed_filesystems:
        allowed = ", ".join(policy.allowed_filesystems) or "none"
        raise FilesystemRefused(
            f"{where} holds a {fstype} filesystem, which is not allowed (allowed: {allowed})"
        )
    return fstype


def mount_method(fstype: str, policy: MountPolicy, *, have_fuse2fs: bool) -> MountMethod:
    """fuse2fs where a userspace driver exists, unless settings ask for kernel mounts."""
    userspace = fstype in fuse2fs.FILESYSTEMS and have_fuse2fs
    if policy.kernel_mount == "always" or (not userspace and policy.kernel_mount == "fallback"):
        return "kernel"
    if userspace:
        return "fuse2fs"
    raise FilesystemRefused(
        f"{fstype} has no userspace driver here and kernel mounts of guest filesystems are "
        "disabled (IMGPREP_MOUNT__KERNEL_MOUNT=never)"
    )


def check_ext_fits(view: Path, *, offset: int, size: int, where: str) -> None:
    """Refuse an ext filesystem whose superblock claims more bytes than its partition holds
    (fuse2fs would follow it into the bytes after the partition), or whose journal needs
    recovery (fuse2fs cannot replay it)."""
    with open(view, "rb") as handle:
        handle.seek(offset + 1024)
        superblock = handle.read(1024)
    if len(superblock) < 1024:
        raise FilesystemRefused(f"{where} is too short for an ext superblock")
    (blocks_lo,) = struct.unpack_from("<I", superblock, 4)
    (log_block,) = struct.unpack_from("<I", superblock, 24)
    (magic,) = struct.unpack_from("<H", superblock, 56)
    (incompat,) = struct.unpack_from("<I", superblock, 96)
    (blocks_hi,) = struct.unpack_from("<I", superblock, 0x150)
    if magic != EXT_MAGIC or log_block > 6:
        raise FilesystemRefused(f"{where} has no valid ext superblock")
    blocks = blocks_lo | ((blocks_hi << 32) if incompat & EXT_INCOMPAT_64BIT else 0)
    claimed = blocks * (1024 << log_block)
    if claimed > size:
        raise FilesystemRefused(
            f"the filesystem on {where} claims {claimed} bytes but its partition holds {size}"
        )
    if incompat & EXT_INCOMPAT_RECOVER:
        raise FilesystemNeedsRecovery(
            f"the filesystem on {where} needs journal recovery: the guest it comes from was not "
            "shut down cleanly. Replay its journal (boot and cleanly shut down the guest, or run "
            "e2fsck on the image) and upload the image again, or prepare the disk without "
            "injected files"
        )


def mount_guest(mapped: MappedDisk, ctx: DeviceContext) -> MountedDisk:
    """Mount the mapped guest filesystem on the disk's private mount directory."""
    disk = disk_key(mapped.prepared.disk)
    area = ctx.work_area(disk)
    check_disk_words(mapped.prepared.disk, ctx)  # the whole request, before the machine
    _check_view(mapped, area)
    check_disk(mapped.prepared.disk, ctx)
    with ctx.locks(ctx.lock_name(disk)):
        claim = Claim.resume(ctx, disk)
        _check_device(mapped, claim)
        _ensure_mounted(mapped, area.mount_dir, claim, ctx)
    return MountedDisk(mapped=mapped, mount_dir=str(area.mount_dir))


def _check_view(mapped: MappedDisk, area: WorkArea) -> None:
    """The view handed over by map_partitions is the one this disk's strategy names, not a
    path from elsewhere."""
    disk = mapped.prepared.disk
    view = choose_view(disk.format, host_capabilities(), disk.backend).path(disk, area)
    if Path(mapped.view) != view:
        raise InvalidRequest(f"mapped view {mapped.view} is not {view}")


def _check_device(mapped: MappedDisk, claim: Claim) -> None:
    """The loop device handed over by map_partitions is one this disk's record names."""
    disk = mapped.prepared.disk
    view = mapped.view
    if mapped.device is not None and not any(
        isinstance(r, LoopDevice) and r.device == mapped.device and r.backing == str(view)
        for r in claim.record.resources
    ):
        raise InvalidRequest(f"device {mapped.device} is not recorded for {disk_key(disk)}")


def _ensure_mounted(mapped: MappedDisk, target: Path, claim: Claim, ctx: DeviceContext) -> None:
    if is_live_mount(target, ctx):
        return
    if mounts.is_mounted(target):  # a dead FUSE mount left by a crashed daemon
        ctx.ops.unmount(target)
    part = mapped.partition
    where = _describe(mapped)
    claim.note(Mount(mount_dir=str(target), method=mapped.method))  # the mount makes `target`
    try:
        if mapped.method == "fuse2fs":
            check_ext_fits(Path(mapped.view), offset=part.offset, size=part.size, where=where)
            ctx.ops.mount_fuse2fs(Path(mapped.view), target, offset=part.offset)
        else:
            if mapped.device is None:
                raise FilesystemRefused(f"{where} has no block device for a kernel mount")
            ctx.ops.mount_kernel(mapped.device, target, fstype=mapped.filesystem)
    except CommandError as error:
        raise FilesystemRefused(f"cannot mount {mapped.filesystem} on {where}: {error}") from None
    if not mounts.is_mounted(target):
        raise FilesystemRefused(
            f"{mapped.method} reported success but nothing is mounted at {target} for {where}"
        )
    if not is_live_mount(target, ctx):  # the driver died after mounting: a dead FUSE mount
        raise FilesystemRefused(
            f"{mapped.method} mounted {mapped.filesystem} on {where} but stopped answering; "
            "the guest filesystem may be damaged (check it with e2fsck or fsck)"
        )
    log.info("guest_mounted", method=mapped.method, filesystem=mapped.filesystem, where=where)


def _describe(mapped: MappedDisk) -> str:
    disk = mapped.prepared.disk
    number = mapped.partition.number
    place = "the whole disk" if number is None else f"partition {number}"
    return f"{place} of {disk.instance_id}/{disk.disk_name}"
