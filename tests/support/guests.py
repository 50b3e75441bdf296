"""Guest disks for the injection tests, built without mounting, and an independent reader.

The reader is debugfs (e2fsprogs), not imgprep's own mounting code: a qcow2 disk is converted to
a raw copy with qemu-img first, then debugfs opens the partition at its byte offset.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.cli.demo.sample_images import Partition, ext4_image, partitioned_disk

MiB = 2**20
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
HOSTNAME = {"/etc/hostname": b"guest\n"}


@dataclass(frozen=True)
class Layout:
    """A guest disk layout, and where imgprep's `auto` should find the filesystem."""

    name: str
    auto_partition: int | None  # None: the whole disk
    offset: int


def build_guest(
    path: Path,
    layout: str,
    *,
    files: Mapping[str, bytes] = HOSTNAME,
    links: Mapping[str, str] | None = None,
) -> Layout:
    """Write a raw guest disk with `layout`: mbr, mbr-logical, gpt or bare."""
    if layout == "bare":
        ext4_image(path, 16, files, links=links)
        return Layout(layout, None, 0)
    if layout == "mbr":
        placed = partitioned_disk(path, [Partition(16, files=files, links=links)])
        return Layout(layout, 1, placed[0][0])
    if layout == "mbr-logical":
        placed = partitioned_disk(
            path,
            [Partition(4, type="c"), Partition(16, files=files, links=links, logical=True)],
        )
        return Layout(layout, 5, placed[1][0])
    if layout == "gpt":
        placed = partitioned_disk(
            path,
            [Partition(4, type=BIOS_BOOT), Partition(16, files=files, links=links)],
            label="gpt",
        )
        return Layout(layout, 2, placed[1][0])
    raise ValueError(layout)


def raw_copy(disk: Path, fmt: str, work: Path) -> Path:
    """The guest disk as raw bytes: the file itself, or a qemu-img conversion of a qcow2."""
    if fmt == "raw":
        return disk
    target = work / f"{disk.name}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", fmt, "-O", "raw", "-U", str(disk), str(target)], check=True
    )
    return target


@dataclass(frozen=True)
class GuestFile:
    content: bytes
    mode: int
    uid: int


def read_guest_file(disk: Path, fmt: str, offset: int, guest_path: str) -> GuestFile | None:
    """A file of the guest filesystem at `offset` of `disk`, read by debugfs; None if absent."""
    with tempfile.TemporaryDirectory(prefix="imgprep-read-") as work:
        raw = raw_copy(disk, fmt, Path(work))
        source = f"{raw}?offset={offset}"
        stat = subprocess.run(
            ["debugfs", "-R", f"stat {guest_path}", source],
            capture_output=True,
            text=True,
            check=False,
        )
        if "File not found" in stat.stderr or "Mode:" not in stat.stdout:
            return None
        content = subprocess.run(
            ["debugfs", "-R", f"cat {guest_path}", source], capture_output=True, check=True
        ).stdout
    mode = re.search(r"Mode:\s+(\d+)", stat.stdout)
    uid = re.search(r"User:\s+(\d+)", stat.stdout)
    assert mode and uid, stat.stdout
    return GuestFile(content=content, mode=int(mode.group(1), 8), uid=int(uid.group(1)))


def fsck_clean(disk: Path, fmt: str, offset: int) -> bool:
    """Whether e2fsck finds the guest filesystem consistent (read-only check)."""
    with tempfile.TemporaryDirectory(prefix="imgprep-fsck-") as work:
        raw = raw_copy(disk, fmt, Path(work))
        done = subprocess.run(
            ["e2fsck", "-fn", f"{raw}?offset={offset}"], capture_output=True, check=False
        )
    return done.returncode == 0


def guest_debugfs(disk: Path, fmt: str, offset: int, command: str) -> str:
    """What debugfs prints for `command` on the guest filesystem at `offset` of `disk`."""
    with tempfile.TemporaryDirectory(prefix="imgprep-read-") as work:
        raw = raw_copy(disk, fmt, Path(work))
        return subprocess.run(
            ["debugfs", "-R", command, f"{raw}?offset={offset}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def list_guest_dir(disk: Path, fmt: str, offset: int, directory: str) -> list[str]:
    listing = guest_debugfs(disk, fmt, offset, f"ls -p {directory}")
    return [line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6]


def guest_link(disk: Path, fmt: str, offset: int, path: str) -> str | None:
    """The target of the guest's symbolic link at `path`, or None if it is not a link."""
    stat = guest_debugfs(disk, fmt, offset, f"stat {path}")
    if "Type: symlink" not in stat:
        return None
    fast = re.search(r'Fast link dest: "(.*)"', stat)
    return fast.group(1) if fast else guest_debugfs(disk, fmt, offset, f"cat {path}")
