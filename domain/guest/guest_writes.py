"""Writing files into a mounted guest filesystem without ever leaving the guest root.

Every path is resolved by the kernel relative to the guest root with openat2(2) and
RESOLVE_IN_ROOT: an absolute link in the guest (`/etc/x -> /root`) and a `..` link
(`../../..`) resolve inside the guest, as they would for the guest itself, so no link can lead
to a host file. Missing parent directories are created (0755, root). The file is written under a
temporary name in its directory and renamed over the final name, so the last component is never
followed: a link there is replaced, not written through.

On kernels without openat2 (before 5.6) the walk opens one component at a time with O_NOFOLLOW
and refuses any link on the way. Either way nothing here takes a path string to the host's
`open()`. This is the part of injection that needs root (files owned by root, in directories
owned by anyone): the privileged helper runs `write_files` with CAP_DAC_OVERRIDE, CAP_CHOWN and
CAP_FOWNER only (domain.guest.privileged).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from domain.core.errors import DeviceError, DiskFull, ImgprepError, InjectionRefused
from domain.core.models import FileInjection, InjectedFile

SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic table)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04  # no link at all, magic ones included (domain.guest.held_files)
RESOLVE_IN_ROOT = 0x10
IN_GUEST_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
DIRECTORY_MODE = 0o755


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_libc = ctypes.CDLL(None, use_errno=True)


OPENAT2_ATTEMPTS = 1000  # EAGAIN: a mount or rename elsewhere raced the walk; each try is ~µs


def openat2(
    dir_fd: int, path: str, flags: int, mode: int = 0, *, resolve: int = IN_GUEST_ROOT
) -> int:
    """openat2(2); by default with RESOLVE_IN_ROOT: `path` resolved as if `dir_fd` were `/`.

    With RESOLVE_IN_ROOT or RESOLVE_BENEATH, the kernel answers EAGAIN when any rename or mount
    happened anywhere on the host while it resolved a `..` (it cannot then prove the walk stayed
    inside): on a host preparing other disks, mounts happen all the time. openat2(2) says to
    try again, which this does, a bounded number of times."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    for _ in range(OPENAT2_ATTEMPTS):
        fd = int(
            _libc.syscall(
                SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)
            )
        )
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code != errno.EAGAIN:
            break
    raise OSError(code, os.strerror(code), path)


def have_openat2() -> bool:
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        os.close(openat2(root, ".", os.O_PATH))
    except OSError as error:
        if error.errno in (errno.ENOSYS, errno.EPERM):
            return False
        raise
    finally:
        os.close(root)
    return True


class GuestRoot:
    """A directory fd standing for the guest's `/`; opens directories below it safely."""

    def __init__(self, root: Path, *, use_openat2: bool | None = None) -> None:
        self.fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.use_openat2 = have_openat2() if use_openat2 is None else use_openat2

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> GuestRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def directory(self, parts: Sequence[str]) -> int:
        """An O_PATH fd of the guest directory `/parts...`, created as needed."""
        if self.use_openat2:
            return self._directory_in_root(parts)
        return self._directory_no_links(parts)

    def _directory_in_root(self, parts: Sequence[str]) -> int:
        flags = os.O_PATH | os.O_DIRECTORY
        for depth in range(len(parts) + 1):
            prefix = "/".join(parts[:depth]) or "."
            try:
                fd = openat2(self.fd, prefix, flags)
            except FileNotFoundError:
                parent = openat2(self.fd, "/".join(parts[: depth - 1]) or ".", flags)
                try:
                    _make_directory(parent, parts[depth - 1])
                finally:
                    os.close(parent)
                try:
                    fd = openat2(self.fd, prefix, flags)
                except FileNotFoundError:
                    raise InjectionRefused(
                        f"/{prefix} in the guest is a link to something that does not exist"
                    ) from None
            if depth == len(parts):
                return fd
            os.close(fd)
        raise AssertionError("unreachable")

    def _directory_no_links(self, parts: Sequence[str]) -> int:
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        current = os.dup(self.fd)
        try:
            for part in parts:
                try:
                    following = os.open(part, flags, dir_fd=current)
                except FileNotFoundError:
                    _make_directory(current, part)
                    following = os.open(part, flags, dir_fd=current)
                except OSError as error:
                    if error.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise InjectionRefused(
                            f"{part!r} in the guest is a link or not a directory; without "
                            "openat2 links are not followed"
                        ) from None
                    raise
                os.close(current)
                current = following
        except BaseException:
            os.close(current)
            raise
        return current


def _make_directory(parent: int, name: str) -> None:
    try:
        os.mkdir(name, DIRECTORY_MODE, dir_fd=parent)
    except FileExistsError:
        return  # made meanwhile, or a link: the caller opens it again, resolved in the root
    os.chown(name, 0, 0, dir_fd=parent, follow_symlinks=False)


def write_file(root: GuestRoot, item: FileInjection) -> InjectedFile:
    """Write one file at its guest path, replacing whatever is at the last component."""
    *parents, name = item.path.strip("/").split("/")
    data = item.data()
    directory = root.directory(parents)
    temporary = f".imgprep-{secrets.token_hex(8)}"
    try:
        fd = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=directory,
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchown(fd, 0, 0)
            os.fchmod(fd, item.mode)
        finally:
            os.close(fd)
        os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        _remove_quietly(directory, temporary)
        raise
    finally:
        os.close(directory)
    return InjectedFile(
        path=item.path, size=len(data), mode=item.mode, sha256=hashlib.sha256(data).hexdigest()
    )


def _remove_quietly(directory: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=directory)


def write_files(
    root: Path, files: Sequence[FileInjection], *, disk: str, use_openat2: bool | None = None
) -> list[InjectedFile]:
    """Write `files` under the guest root `root`; an OSError becomes the imgprep error for it."""
    written: list[InjectedFile] = []
    item: FileInjection | None = None
    try:
        with GuestRoot(root, use_openat2=use_openat2) as guest:
            for item in files:
                written.append(write_file(guest, item))
    except OSError as error:
        raise typed_error(error, disk, item) from None
    return written


def typed_error(error: OSError, key: str, item: FileInjection | None) -> ImgprepError:
    """The imgprep error for an OSError met while writing `item` into the guest of `key`."""
    what = item.path if item else "the guest root"
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        size = len(item.data()) if item else 0
        return DiskFull(f"the guest filesystem of {key} has no room for {what} ({size} bytes)")
    if code == errno.EROFS:
        return DeviceError(
            f"the guest filesystem of {key} is read-only (does its journal need recovery?)"
        )
    if code in (errno.ENOTCONN, errno.EIO):
        return DeviceError(
            f"the guest filesystem of {key} failed while writing {what}: {error.strerror}"
        )
    if code in (errno.EISDIR, errno.ENOTEMPTY, errno.ENOTDIR, errno.EXDEV, errno.ELOOP):
        return InjectionRefused(f"cannot write {what} into {key}: {error.strerror}")
    return DeviceError(f"cannot write {what} into {key}: {error.strerror}")
