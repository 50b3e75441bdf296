"""Opening the worker's files for a tool that runs as root, so that the tool gets the file that
was checked and nothing a link points to.

Instance disks and cache entries belong to the workers' user, in directories it owns: between
the privileged helper's check of a path and a tool opening it by name, the worker could swap the
file, or a directory above it, for a link to /etc/shadow or /dev/sda. So the operation opens the
file itself, in one step and without following any link on the whole path (openat2(2) with
RESOLVE_NO_SYMLINKS; on kernels without openat2, one component at a time with O_NOFOLLOW),
checks what it opened (fstat: a regular file owned by root or the workers' user), and hands the
tool the open file as `/proc/self/fd/N` (losetup is not used for this: it resolves such a path
back to a name and opens that; the loop device is configured with the descriptor itself,
domain.guest.tools.losetup.attach_fd).

A process that is itself the trust boundary (a worker running as root, without the helper)
passes `owners=None`: the file is opened as the tools opened it before, following links.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from domain.core.errors import DeviceError, PrivilegeRefused
from domain.guest import guest_writes

AT_FDCWD = -100


@contextmanager
def held(path: Path, *, write: bool, owners: frozenset[int] | None) -> Iterator[int]:
    """An open descriptor of the regular file `path` (read-write with `write`), for the
    duration of the block; with `owners`, no link is followed and the owner must be one of
    them (PrivilegeRefused otherwise)."""
    fd = open_held(path, write=write, owners=owners)
    try:
        yield fd
    finally:
        os.close(fd)


def open_held(path: Path, *, write: bool, owners: frozenset[int] | None) -> int:
    """`held`'s descriptor, for a caller that closes it itself (or execs with it)."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags) if owners is None else _open_no_links(path, flags)
    except FileNotFoundError:
        raise DeviceError(f"{path} does not exist") from None
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            raise PrivilegeRefused(
                f"{path} is, or goes through, a symbolic link: refused (the worker's files are "
                "opened without following links)"
            ) from None
        raise
    try:
        _check(fd, path, owners)
        os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO put there from blocking open
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int) -> Path:
    """The name a child process opens the inherited descriptor `fd` by."""
    return Path(f"/proc/self/fd/{fd}")


def _check(fd: int, path: Path, owners: frozenset[int] | None) -> None:
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        raise PrivilegeRefused(f"{path} is not a regular file")
    if owners is not None and status.st_uid not in owners:
        raise PrivilegeRefused(
            f"{path} belongs to uid {status.st_uid}, neither root nor the workers' user: refused"
        )


def _open_no_links(path: Path, flags: int) -> int:
    if guest_writes.have_openat2():
        return guest_writes.openat2(
            AT_FDCWD, str(path), flags, resolve=guest_writes.RESOLVE_NO_SYMLINKS
        )
    *parents, name = path.parts[1:]
    current = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parents:
            following = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
            )
            os.close(current)
            current = following
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=current)
    finally:
        os.close(current)
