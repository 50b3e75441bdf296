"""A disk's work area: the directory of its mount point (`root`), FUSE export (`export`) and
qemu-storage-daemon pid file, made and removed by the privileged side.

With the privileged helper, work areas live in root's own tree (worker.settings
Settings.devices_dir), which the unprivileged worker can read but not change: everything root
does there (mounting, the daemon writing its pid file, removing) acts on what imgprep made, never
on a link a worker put in its place. Without the helper, they live in `<state_dir>/devices` of
the worker, which then runs as root itself.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from domain.core.errors import DeviceBusy, DeviceError
from domain.guest.tools import mount as mounts

MOUNT_POINT = "root"
EXPORT = "export"
PIDFILE = "storage-daemon.pid"
AREA_MODE = 0o755  # the worker reads the FUSE export (its partition table) inside
# With the helper: the workers' group may enter (the worker reads the export; the FUSE daemons
# run as the workers' user and open the mount point), others may not (the guest's mount is
# allow_other, so that root writes into it, and the export is the guest's disk).
SHARED_AREA_MODE = 0o750
MOUNT_POINT_MODE = 0o755  # the area above it decides who may enter


def make(area: Path, group: int | None = None) -> None:
    """Create the work area (and the devices directory above it, without the helper); with
    `group` (the helper: the workers'), the area is root's and that group's alone."""
    area.mkdir(mode=AREA_MODE, parents=True, exist_ok=True)
    _expect(area, stat.S_ISDIR, "a directory")
    if group is not None:
        os.chown(area, 0, group, follow_symlinks=False)
        os.chmod(area, SHARED_AREA_MODE, follow_symlinks=False)


def make_mount_point(target: Path) -> None:
    """The guest's mount point `root` of a work area, created if missing."""
    target.mkdir(mode=MOUNT_POINT_MODE, exist_ok=True)
    _expect(target, stat.S_ISDIR, "a directory")


def make_export(export: Path) -> None:
    """The file qemu-storage-daemon mounts its FUSE export over, created if missing (0600)."""
    fd = os.open(export, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    _expect(export, stat.S_ISREG, "a regular file")


def remove(area: Path) -> bool:
    """Remove the mount point, export file and pid file — only once nothing is mounted on them —
    then the area, and its instance's directory once that is empty. False when the area holds
    something imgprep did not put there (left for a person to look at)."""
    for name in (MOUNT_POINT, EXPORT):
        if mounts.is_mounted(area / name):
            raise DeviceBusy(f"{area / name} is still mounted; its release is retried")
    try:
        fd = os.open(area, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(MOUNT_POINT, dir_fd=fd)
        for name in (EXPORT, PIDFILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        area.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    with contextlib.suppress(OSError):  # the instance's directory, once its last disk is gone
        area.parent.rmdir()
    return True


def _expect(path: Path, kind: Callable[[int], bool], what: str) -> None:
    if not kind(path.lstat().st_mode):
        raise DeviceError(f"{path} is not {what}")
