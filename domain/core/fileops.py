"""Filesystem primitives of publishing: durable writes, a rename that never replaces, removal.

`rename_new` moves a file to a name that must not exist yet, atomically: `renameat2` with
`RENAME_NOREPLACE` (Linux ≥ 3.15 on ext4, xfs, btrfs, tmpfs), and where the filesystem does not
take that flag (NFS, some FUSE filesystems), a hard link to the new name and an unlink of the
old one, which is just as exclusive (link fails with EEXIST) but may leave the old name behind
if the process dies between the two.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2() -> Callable[[Path, Path], None] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):  # not glibc ≥ 2.28: links only
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int

    def renameat2_noreplace(source: Path, target: Path) -> None:
        if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(source), None, str(target))

    return renameat2_noreplace


_renameat2 = _load_renameat2()


def rename_new(source: Path, target: Path) -> None:
    """Rename `source` to `target` unless `target` exists (FileExistsError, nothing changed);
    FileNotFoundError when `source` is gone."""
    if _renameat2 is not None:
        try:
            _renameat2(source, target)
            return
        except OSError as error:
            if error.errno == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, "already exists", str(target)) from None
            if error.errno == errno.ENOENT:
                raise FileNotFoundError(errno.ENOENT, "no such file", str(source)) from None
            if error.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
    os.link(source, target)
    with contextlib.suppress(FileNotFoundError):
        source.unlink()


def write_new(path: Path, text: str) -> None:
    """Write `text` to the new file `path` (it must not exist) and wait until it is on disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomically(path: Path, text: str, temporary: Path) -> None:
    """Replace `path` by a file holding `text`, written first to `temporary` (a name of the
    writer's own, so two writers never write into one file)."""
    write_new(temporary, text)
    os.replace(temporary, path)


def fsync_file(path: Path) -> None:
    """Wait until the data of `path` is on disk (cheap when its writer already synced it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_files(paths: Sequence[Path]) -> list[Path]:
    """Remove each of `paths` that exists; the ones removed."""
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
