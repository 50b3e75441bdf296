"""Loop devices over a file, one partition at a time (an offset and a size limit).

Loop partition scanning is not used: it does not work everywhere, and a loop device per
partition, with its offset and size limit, exposes exactly the bytes that were validated.
Devices are attached with the loop ioctls on a file already open (`attach_fd`), never by name:
losetup(8) resolves even `/proc/self/fd/N` back to a name and opens that. losetup lists and
detaches them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from domain.core.errors import DeviceError, NoFreeDevice
from domain.core.runner import Runner

LOSETUP = "losetup"


@dataclass(frozen=True)
class LoopDevice:
    name: str
    back_file: str
    offset: int
    sizelimit: int


LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8: attach and set offset and size limit in one ioctl
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
CONFIGURE_ATTEMPTS = 16  # another attach can take the free device between the two ioctls


class _LoopInfo64(ctypes.Structure):
    _fields_ = (
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * 64),
        ("lo_crypt_name", ctypes.c_char * 64),
        ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    )


class _LoopConfig(ctypes.Structure):
    _fields_ = (
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    )


def attach_fd(fd: int, *, offset: int, size: int, name: str) -> str:
    """Attach a free loop device to `size` bytes from `offset` of the open file `fd`; its /dev
    path. The kernel gets the descriptor itself (what losetup does after opening a name), so the
    device is over exactly the file that was opened. `name`: what the device reports as its
    file name (informational; the backing file's real path is in sysfs)."""
    info = _LoopInfo64(lo_offset=offset, lo_sizelimit=size)
    info.lo_file_name = os.fsencode(name)[:63]
    try:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        raise DeviceError(f"cannot open {LOOP_CONTROL}: {error.strerror}") from None
    try:
        for _ in range(CONFIGURE_ATTEMPTS):
            try:
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            except OSError as error:
                raise NoFreeDevice(f"no free loop device for {name}: {error.strerror}") from None
            device = f"/dev/loop{number}"
            if _configure(device, fd, info):
                return device
    finally:
        os.close(control)
    raise NoFreeDevice(f"no free loop device for {name}: each one found was taken meanwhile")


def _configure(device: str, fd: int, info: _LoopInfo64) -> bool:
    """Attach `fd` to `device`; False if another attach took it first."""
    loop = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(loop, LOOP_CONFIGURE, bytes(_LoopConfig(fd=fd, info=info)))
        except OSError as error:
            if error.errno == errno.EBUSY:
                return False
            if error.errno not in (errno.EINVAL, errno.ENOTTY):
                raise DeviceError(f"cannot attach {device}: {error.strerror}") from None
            _set_fd(loop, device, fd, info)  # a kernel before 5.8
        return True
    finally:
        os.close(loop)


def _set_fd(loop: int, device: str, fd: int, info: _LoopInfo64) -> None:
    try:
        fcntl.ioctl(loop, LOOP_SET_FD, fd)
    except OSError as error:
        raise DeviceError(f"cannot attach {device}: {error.strerror}") from None
    try:
        fcntl.ioctl(loop, LOOP_SET_STATUS64, bytes(info))
    except OSError as error:
        with contextlib.suppress(OSError):
            fcntl.ioctl(loop, LOOP_CLR_FD)
        raise DeviceError(f"cannot set the offset of {device}: {error.strerror}") from None


def detach(runner: Runner, device: str) -> None:
    runner.run([LOSETUP, "--detach", device], timeout=60)


def devices(runner: Runner) -> list[LoopDevice]:
    """Every attached loop device with its backing file, offset and size limit."""
    result = runner.run(
        [LOSETUP, "--list", "--json", "--output", "NAME,BACK-FILE,OFFSET,SIZELIMIT"], timeout=60
    )
    if not result.stdout.strip():
        return []
    listed = json.loads(result.stdout).get("loopdevices", [])
    return [
        LoopDevice(
            name=str(item["name"]),
            back_file=str(item.get("back-file") or "").removesuffix(" (deleted)"),
            offset=int(item.get("offset") or 0),
            sizelimit=int(item.get("sizelimit") or 0),
        )
        for item in listed
    ]


def backed_by(runner: Runner, backing: Path, offset: int | None = None) -> list[LoopDevice]:
    """The loop devices over `backing` (at `offset`, when given)."""
    return [
        device
        for device in devices(runner)
        if device.back_file == str(backing) and (offset is None or device.offset == offset)
    ]
