"""Partition tables read from the raw bytes of a guest disk: MBR (with extended and logical
partitions) and GPT, every entry validated against the disk before anything uses it.

Guest disks are untrusted input, so the parser assumes nothing: an entry past the end of the
disk, two data partitions that overlap, a zero-sized entry, an extended-partition chain that
loops or leaves its container, a GPT whose checksums do not match — each refuses the table with
a PartitionTableInvalid naming the entry. Numbering follows Linux: MBR primaries 1-4 by slot,
logical partitions from 5 in chain order; GPT entries by their index from 1.

`choose()` applies the request's partition choice (Nova's semantics: a partition that is not
there is an error naming it): `none` is the whole disk, a number is that partition, `auto` is
the only Linux filesystem partition, else the largest of the Linux ones, else the largest.
"""

from __future__ import annotations

import itertools
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

from domain.core.errors import PartitionNotFound, PartitionTableInvalid

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
GPT_SIGNATURE = b"EFI PART"
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
PROTECTIVE_TYPE = 0xEE
LINUX_MBR_TYPE = 0x83
MAX_LOGICAL = 128  # Linux itself stops scanning an extended chain far earlier in practice
MAX_GPT_ENTRIES = 1024
LINUX_DATA_GPT_TYPE = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")  # Linux filesystem data
# Linux filesystem data, and the discoverable-partitions root/home/srv types that hold one.
LINUX_GPT_TYPES = frozenset(
    {LINUX_DATA_GPT_TYPE}
    | {
        uuid.UUID(text)
        for text in (
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",  # root, x86-64
            "44479540-f297-41b2-9af7-d131d5f0458a",  # root, x86
            "b921b045-1df0-41c3-af44-4c6f280d3fae",  # root, arm64
            "933ac7e1-2eb4-4f13-b844-0e14e2aef915",  # /home
            "3b8f8425-20e0-4f3b-907f-1a25a76f98e8",  # /srv
        )
    }
)

PartitionChoice = Literal["auto", "none"] | int


@dataclass(frozen=True)
class Partition:
    """One data partition: its number, where it is in bytes, and whether it holds Linux data."""

    number: int
    offset: int
    size: int
    type: str  # "0x83" for MBR, the type GUID for GPT
    linux: bool

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class PartitionTable:
    """What the disk holds: `none` (no table: a bare filesystem, or nothing), `mbr` or `gpt`."""

    label: Literal["none", "mbr", "gpt"]
    partitions: tuple[Partition, ...]

    def numbers(self) -> str:
        return ", ".join(str(p.number) for p in self.partitions) or "none"


def read_table(disk: BinaryIO, disk_size: int) -> PartitionTable:
    """Parse and validate the partition table of `disk` (`disk_size` bytes long)."""
    mbr = _read_at(disk, 0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE:
        return PartitionTable("none", ())
    entries = [_mbr_entry(mbr, slot) for slot in range(4)]
    if not _looks_like_mbr(mbr, entries):
        return PartitionTable("none", ())
    if any(kind == PROTECTIVE_TYPE for _, kind, _, _ in entries):
        return _gpt(disk, disk_size)
    return _mbr(disk, disk_size, entries)


def choose(
    table: PartitionTable, choice: PartitionChoice, disk_size: int, disk: str = "the disk"
) -> Partition | None:
    """The partition to mount, or None for the whole disk; PartitionNotFound if it is missing."""
    if choice == "none":
        return None
    if choice == "auto":
        if not table.partitions:
            return None
        linux = [p for p in table.partitions if p.linux]
        candidates = linux or list(table.partitions)
        return max(candidates, key=lambda p: (p.size, -p.number))
    for partition in table.partitions:
        if partition.number == choice:
            return partition
    holds = (
        "has no partition table"
        if table.label == "none"
        else f"has {table.label.upper()} partitions {table.numbers()}"
    )
    raise PartitionNotFound(
        f"partition {choice} not found on {disk}: it ({disk_size} bytes) {holds}"
    )


# -- MBR -------------------------------------------------------------------------------------------

_Entry = tuple[int, int, int, int]  # (status, type, first sector, sectors)


def _mbr_entry(sector: bytes, slot: int) -> _Entry:
    raw = sector[446 + 16 * slot : 446 + 16 * (slot + 1)]
    status, kind = raw[0], raw[4]
    first, count = struct.unpack_from("<II", raw, 8)
    return status, kind, first, count


def _looks_like_mbr(sector: bytes, entries: Sequence[_Entry]) -> bool:
    # A FAT boot sector also ends in 55 AA; its boot code leaves garbage in the status bytes.
    return all(status in (0x00, 0x80) for status, _, _, _ in entries) and any(
        kind != 0 for _, kind, _, _ in entries
    )


def _mbr(disk: BinaryIO, disk_size: int, entries: Sequence[_Entry]) -> PartitionTable:
    data: list[Partition] = []
    extended: tuple[int, int] | None = None
    for slot, (_, kind, first, count) in enumerate(entries, start=1):
        if kind == 0:
            continue
        _check_extent(slot, first * SECTOR, count * SECTOR, disk_size)
        if kind in EXTENDED_TYPES:
            if extended is not None:
                raise PartitionTableInvalid(f"MBR entry {slot} is a second extended partition")
            extended = (first, count)
            continue
        data.append(_mbr_partition(slot, kind, first, count))
    if extended is not None:
        start, count = extended
        for partition in data:
            if _overlaps(partition.offset, partition.end, start * SECTOR, (start + count) * SECTOR):
                raise PartitionTableInvalid(
                    f"partition {partition.number} overlaps the extended partition"
                )
        data += _logical(disk, disk_size, start, count)
    _check_no_overlap(data)
    return PartitionTable("mbr", tuple(data))


def _mbr_partition(number: int, kind: int, first: int, count: int) -> Partition:
    return Partition(
        number=number,
        offset=first * SECTOR,
        size=count * SECTOR,
        type=f"0x{kind:02x}",
        linux=kind == LINUX_MBR_TYPE,
    )


def _logical(disk: BinaryIO, disk_size: int, ext_start: int, ext_count: int) -> list[Partition]:
    """Follow the chain of extended boot records inside the extended partition."""
    ext_end = ext_start + ext_count
    found: list[Partition] = []
    ebr = ext_start
    while True:
        number = 5 + len(found)
        if number - 5 >= MAX_LOGICAL:
            raise PartitionTableInvalid(f"more than {MAX_LOGICAL} logical partitions")
        sector = _read_at(disk, ebr * SECTOR, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != MBR_SIGNATURE:
            if not found and not any(sector):
                return found  # an empty extended partition
            raise PartitionTableInvalid(f"the boot record of logical partition {number} is missing")
        _, kind, first, count = _mbr_entry(sector, 0)
        _, next_kind, next_first, _ = _mbr_entry(sector, 1)
        if kind != 0:
            start = ebr + first
            if first == 0 or start + count > ext_end:
                raise PartitionTableInvalid(
                    f"logical partition {number} lies outside its extended partition"
                )
            _check_extent(number, start * SECTOR, count * SECTOR, disk_size)
            found.append(_mbr_partition(number, kind, start, count))
        if next_kind == 0 or next_first == 0:
            return found
        following = ext_start + next_first
        if following <= ebr or following >= ext_end:
            raise PartitionTableInvalid(
                f"the chain of logical partitions after partition {number} points backwards "
                "or outside its extended partition"
            )
        ebr = following


# -- GPT -------------------------------------------------------------------------------------------


def _gpt(disk: BinaryIO, disk_size: int) -> PartitionTable:
    problems = []
    for sector in (SECTOR, 4096):
        for lba in (1, disk_size // sector - 1):
            try:
                return _gpt_at(disk, disk_size, sector, lba)
            except PartitionTableInvalid as problem:
                problems.append(str(problem))
    primary = problems[0] if problems else "no GPT header"
    raise PartitionTableInvalid(f"GPT unreadable (primary and backup header): {primary}")


def _gpt_at(disk: BinaryIO, disk_size: int, sector: int, lba: int) -> PartitionTable:
    header = _read_at(disk, lba * sector, sector)
    if header[:8] != GPT_SIGNATURE:
        raise PartitionTableInvalid(f"no GPT header at LBA {lba} ({sector}-byte sectors)")
    (header_size,) = struct.unpack_from("<I", header, 12)
    if not 92 <= header_size <= sector:
        raise PartitionTableInvalid(f"GPT header size {header_size} is not valid")
    (stored_crc,) = struct.unpack_from("<I", header, 16)
    blank = header[:16] + b"\0\0\0\0" + header[20:header_size]
    if zlib.crc32(blank) != stored_crc:
        raise PartitionTableInvalid(f"GPT header at LBA {lba} fails its checksum")
    first_usable, last_usable = struct.unpack_from("<QQ", header, 40)
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if count > MAX_GPT_ENTRIES or entry_size < 128 or entry_size % 8 or entry_size > 4096:
        raise PartitionTableInvalid(f"GPT declares {count} entries of {entry_size} bytes")
    disk_sectors = disk_size // sector
    if entries_lba * sector + count * entry_size > disk_size:
        raise PartitionTableInvalid("GPT entry array lies past the end of the disk")
    array = _read_at(disk, entries_lba * sector, count * entry_size)
    if zlib.crc32(array) != entries_crc:
        raise PartitionTableInvalid("GPT entry array fails its checksum")
    if last_usable >= disk_sectors or first_usable > last_usable:
        raise PartitionTableInvalid("GPT usable area lies past the end of the disk")
    data = []
    for index in range(count):
        raw = array[index * entry_size : index * entry_size + 128]
        kind = uuid.UUID(bytes_le=raw[:16])
        if kind.int == 0:
            continue
        first, last = struct.unpack_from("<QQ", raw, 32)
        number = index + 1
        if last < first:
            raise PartitionTableInvalid(f"partition {number} ends before it starts")
        if first < first_usable or last > last_usable:
            raise PartitionTableInvalid(f"partition {number} lies outside the GPT usable area")
        size = (last - first + 1) * sector
        _check_extent(number, first * sector, size, disk_size)
        data.append(
            Partition(
                number=number,
                offset=first * sector,
                size=size,
                type=str(kind).upper(),
                linux=kind in LINUX_GPT_TYPES,
            )
        )
    _check_no_overlap(data)
    return PartitionTable("gpt", tuple(data))


# -- checks ----------------------------------------------------------------------------------------


def _check_extent(number: int, offset: int, size: int, disk_size: int) -> None:
    if size <= 0:
        raise PartitionTableInvalid(f"partition {number} has a size of zero")
    if offset < SECTOR:
        raise PartitionTableInvalid(f"partition {number} starts inside the partition table")
    if offset + size > disk_size:
        raise PartitionTableInvalid(
            f"partition {number} ends at byte {offset + size}, past the end of the disk "
            f"({disk_size} bytes)"
        )


def _check_no_overlap(partitions: Sequence[Partition]) -> None:
    ordered = sorted(partitions, key=lambda p: p.offset)
    for before, after in itertools.pairwise(ordered):
        if _overlaps(before.offset, before.end, after.offset, after.end):
            raise PartitionTableInvalid(f"partitions {before.number} and {after.number} overlap")


def _overlaps(start_a: int, end_a: int, start_b: int, end_b: int) -> bool:
    return start_a < end_b and start_b < end_a


def _read_at(disk: BinaryIO, offset: int, size: int) -> bytes:
    disk.seek(offset)
    return disk.read(size)
