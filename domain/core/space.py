"""Full filesystems: ENOSPC turned into the permanent DiskFull error that names the filesystem
and what was needed, wherever an image is written (downloads, conversions, copies)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from domain.core.errors import DiskFull

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


@contextlib.contextmanager
def space_guard(dest: Path, needed: int | None) -> Iterator[None]:
    """Turn a full filesystem (ENOSPC, EDQUOT) into the permanent DiskFull error."""
    try:
        yield
    except OSError as error:
        if error.errno in NO_SPACE_ERRNOS:
            raise disk_full(dest, needed) from None
        raise


def out_of_space(stderr: str) -> bool:
    """Whether a command's error output says the filesystem was full."""
    return any(text in stderr for text in NO_SPACE_TEXT)


def disk_full(path: Path, needed: int | None) -> DiskFull:
    """The DiskFull error for a write under `path`: which filesystem, how much it had."""
    mount = mount_point(path.parent)
    stat = os.statvfs(path.parent)
    free = stat.f_bavail * stat.f_frsize
    size = stat.f_blocks * stat.f_frsize
    wanted = f"it needs up to {needed} bytes" if needed else "its size was not known in advance"
    return DiskFull(
        f"no space left on the filesystem at {mount} ({size} bytes in all, {free} free) while "
        f"writing {path.name}: {wanted}; the partial file was removed, make room or move "
        "the directory to a larger filesystem"
    )


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds `path`."""
    path = path.resolve()
    device = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == device:
        path = path.parent
    return path
