"""mount(8), umount(8) and blkid(8): kernel mounts, unmounting, and filesystem detection.

`blkid -p` probes the superblock of one byte range of an image file (`--offset`, `--size`), so
the filesystem type is known before any loop device or mount exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from domain.core.errors import DeviceBusy
from domain.core.runner import CommandError, Runner

BLKID = "blkid"
NOTHING_FOUND = 2  # blkid: no signature in the range
AMBIVALENT = 8  # blkid -p: more than one signature


def probe(runner: Runner, image: Path, *, offset: int, size: int) -> tuple[int, dict[str, str]]:
    """blkid's exit status and its `KEY=value` fields for `size` bytes of `image` at `offset`."""
    result = runner.run(
        [
            BLKID,
            "--probe",
            "--output",
            "export",
            "--offset",
            str(offset),
            "--size",
            str(size),
            str(image),
        ],
        timeout=60,
        check=False,
    )
    fields = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return result.returncode, fields


def mount(runner: Runner, device: str, target: Path, *, fstype: str, options: str) -> None:
    runner.run(["mount", "-t", fstype, "-o", options, device, str(target)], timeout=120)


def unmount(runner: Runner, target: Path) -> None:
    """Unmount `target`; a mount still in use is DeviceBusy (worth retrying)."""
    try:
        runner.run(["umount", str(target)], timeout=120)
    except CommandError as error:
        if "busy" in str(error).lower():
            raise DeviceBusy(f"{target} is still in use: {error}") from None
        raise


def is_mounted(target: Path) -> bool:
    """Whether something is mounted exactly at `target` (read from /proc/self/mountinfo)."""
    wanted = os.fsencode(str(target))
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if len(fields) > 4 and unescape_mount_point(fields[4]) == wanted:
                return True
    return False


def unescape_mount_point(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    out = bytearray()
    index = 0
    while index < len(field):
        if field[index : index + 1] == b"\\" and field[index + 1 : index + 4].isdigit():
            out.append(int(field[index + 1 : index + 4], 8))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return bytes(out)
