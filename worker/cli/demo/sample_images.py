"""Guest disk images built without mounting anything, for the demo, tests and benchmarks.

A filesystem is made with `mkfs.ext4 -d DIR` straight into a file, a partition table is
written with `sfdisk`, and the filesystem is copied into place at its partition's offset. The
result is byte-for-byte reproducible: fixed UUID, hash seed and timestamps.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from domain.core.runner import Runner
from domain.formats.partitions import LINUX_DATA_GPT_TYPE, LINUX_MBR_TYPE, SECTOR

FIXED_UUID = "6b3e0c1a-0f5e-4f1e-9a57-2f0c4f3b9d11"
FIXED_TIME = "1700000000"
LINUX = f"{LINUX_MBR_TYPE:02x}"  # sfdisk types
LINUX_GPT = str(LINUX_DATA_GPT_TYPE).upper()


@dataclass(frozen=True)
class Partition:
    """A partition to create: its size in MiB and, optionally, the files of its ext4 filesystem."""

    size_mib: int
    files: Mapping[str, bytes] | None = None
    type: str | None = None  # sfdisk type; default Linux for the label
    logical: bool = False  # MBR only: inside an extended partition
    links: Mapping[str, str] | None = None  # guest path → link target, as symbolic links


def ext4_image(
    path: Path,
    size_mib: int,
    files: Mapping[str, bytes],
    runner: Runner | None = None,
    *,
    links: Mapping[str, str] | None = None,
) -> None:
    """An ext4 filesystem of `size_mib` MiB at `path` holding `files` (guest path → content)
    and symbolic `links` (guest path → target, written as given)."""
    run = runner or Runner()
    with tempfile.TemporaryDirectory(prefix="imgprep-fs-") as staging:
        root = Path(staging)
        for guest_path, content in files.items():
            target = root / guest_path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        for guest_path, link_target in (links or {}).items():
            link = root / guest_path.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(link_target)
        for entry in [*root.rglob("*"), root]:
            os.utime(entry, (int(FIXED_TIME), int(FIXED_TIME)), follow_symlinks=False)
        path.unlink(missing_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(size_mib * 2**20)
        runner_env = dict(run.env, E2FSPROGS_FAKE_TIME=FIXED_TIME)
        fixed = Runner(default_timeout=run.default_timeout, env=runner_env)
        fixed.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-U",
                FIXED_UUID,
                "-E",
                f"hash_seed={FIXED_UUID},root_owner=0:0",
                "-d",
                str(root),
                str(path),
            ]
        )
        # mkfs copies each source inode's change time, which cannot be set on the host: fix it
        # inside the image instead.
        inodes = ["/", *("/" + str(p.relative_to(root)) for p in root.rglob("*"))]
        script = "".join(
            f"sif {inode} {field} {FIXED_TIME}\n"
            for inode in inodes
            for field in ("ctime", "crtime")
        )
        fixed.run(["debugfs", "-w", "-f", "-", str(path)], stdin=script)


def partitioned_disk(
    path: Path,
    partitions: Sequence[Partition],
    *,
    label: str = "dos",
    runner: Runner | None = None,
) -> list[tuple[int, int]]:
    """A raw disk with `partitions` (MBR `dos` or `gpt`), each ext4 when it has files.

    Returns (offset, size) in bytes of each partition in table order: primary partitions as
    given, then logical ones (numbered from 5).
    """
    run = runner or Runner()
    gap_mib = 1  # alignment, room for the EBRs of logical partitions and the GPT backup
    total_mib = 1 + sum(p.size_mib + gap_mib for p in partitions) + 1
    path.unlink(missing_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(total_mib * 2**20)
    script = _sfdisk_script(partitions, label)
    run.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)], stdin=script)
    layout = _read_layout(path, run)
    data_partitions = [
        p for p in layout if p[2] not in ("5", "f", "85")
    ]  # skip the extended container
    placed = []
    in_table_order = [p for p in partitions if not p.logical] + [p for p in partitions if p.logical]
    for spec, (start, size, _type) in zip(in_table_order, data_partitions, strict=True):
        if spec.files is not None or spec.links:
            with tempfile.TemporaryDirectory(prefix="imgprep-part-") as work:
                fs = Path(work) / "fs.img"
                ext4_image(fs, size // 2**20, spec.files or {}, run, links=spec.links)
                _copy_into(fs, path, start)
        placed.append((start, size))
    return placed


def _sfdisk_script(partitions: Sequence[Partition], label: str) -> str:
    label_id = "0x1b3e0c1a" if label == "dos" else FIXED_UUID
    lines = [f"label: {label}", f"label-id: {label_id}", "unit: sectors", ""]
    default_type = LINUX if label == "dos" else LINUX_GPT
    logical = [p for p in partitions if p.logical]
    primary = [p for p in partitions if not p.logical]
    # Each line names its partition number ("partN :"): without it sfdisk would take the line
    # after the extended partition for another primary one.
    for index, part in enumerate(primary):
        lines.append(f"part{index + 1} : " + _line(part, default_type, label, index))
    if logical:
        if label != "dos":
            raise ValueError("logical partitions exist only on MBR disks")
        if len(primary) > 3:
            raise ValueError("an MBR disk with logical partitions has room for 3 primary ones")
        extended = sum(p.size_mib + 1 for p in logical) * 2**20 // SECTOR
        lines.append(f"part{len(primary) + 1} : size={extended}, type=5")
        for number, part in enumerate(logical, start=5):
            index = number - 4 + len(primary)
            lines.append(f"part{number} : " + _line(part, default_type, label, index))
    return "\n".join(lines) + "\n"


def _line(part: Partition, default_type: str, label: str, index: int) -> str:
    line = f"size={part.size_mib * 2**20 // SECTOR}, type={part.type or default_type}"
    if label == "gpt":  # fixed partition GUIDs keep the image reproducible
        line += f", uuid={FIXED_UUID[:-2]}{index:02x}"
    return line


def _read_layout(path: Path, runner: Runner) -> list[tuple[int, int, str]]:
    dump = json.loads(runner.run(["sfdisk", "--json", str(path)]).stdout)
    table = dump["partitiontable"]
    return [
        (int(p["start"]) * SECTOR, int(p["size"]) * SECTOR, str(p["type"]).lower())
        for p in table.get("partitions", [])
    ]


def _copy_into(source: Path, disk: Path, offset: int) -> None:
    with open(source, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(offset)
        shutil.copyfileobj(src, dst, 4 * 2**20)
