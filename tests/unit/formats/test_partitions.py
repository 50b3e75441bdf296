"""Partition tables: real ones written by sfdisk, and hostile ones built byte by byte."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest

from domain.core.errors import PartitionNotFound, PartitionTableInvalid
from domain.formats.partitions import LINUX_GPT_TYPES, Partition, PartitionTable, choose, read_table

MiB = 2**20
SECTOR = 512


def sfdisk(path: Path, script: str, size: int = 64 * MiB) -> list[dict[str, object]]:
    with open(path, "wb") as handle:
        handle.truncate(size)
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )
    dump = subprocess.run(
        ["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True
    )
    return list(json.loads(dump.stdout)["partitiontable"]["partitions"])


def table_of(path: Path) -> PartitionTable:
    with open(path, "rb") as handle:
        return read_table(handle, path.stat().st_size)


def as_numbers(table: PartitionTable) -> list[tuple[int, int, int]]:
    return [(p.number, p.offset // SECTOR, p.size // SECTOR) for p in table.partitions]


def expected_from_sfdisk(listed: list[dict[str, object]]) -> list[tuple[int, int, int]]:
    found = []
    for item in listed:
        if str(item["type"]) in ("5", "f", "85"):
            continue  # the extended container is not a data partition
        number = int(str(item["node"]).rsplit("disk", 1)[1])
        found.append((number, int(str(item["start"])), int(str(item["size"]))))
    return found


@pytest.mark.parametrize(
    ("label", "script"),
    [
        ("mbr", "label: dos\npart1 : size=16MiB, type=83\n"),
        (
            "mbr",
            "label: dos\npart1 : size=8MiB, type=c\npart2 : size=40MiB, type=5\n"
            "part5 : size=16MiB, type=83\npart6 : size=8MiB, type=82\n",
        ),
        (
            "gpt",
            "label: gpt\npart1 : size=4MiB, type=21686148-6449-6E6F-744E-656564454649\n"
            "part2 : size=32MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        ),
    ],
    ids=["mbr-one", "mbr-logical", "gpt-two"],
)
def test_tables_written_by_sfdisk_read_the_same(tmp_path: Path, label: str, script: str) -> None:
    # Given a disk whose table sfdisk wrote
    disk = tmp_path / "disk"
    listed = sfdisk(disk, script)

    # When imgprep reads it
    table = table_of(disk)

    # Then it finds the same data partitions, numbered as Linux numbers them
    assert table.label == label
    assert as_numbers(table) == expected_from_sfdisk(listed)


def test_a_bare_filesystem_has_no_table(tmp_path: Path) -> None:
    disk = tmp_path / "fs"
    with open(disk, "wb") as handle:
        handle.truncate(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True)
    assert table_of(disk) == PartitionTable("none", ())


# -- hostile MBRs ----------------------------------------------------------------------------------


def mbr(entries: list[tuple[int, int, int]], size: int = 8 * MiB) -> io.BytesIO:
    """An in-memory disk whose MBR has (type, first sector, sectors) entries."""
    disk = bytearray(size)
    for slot, (kind, first, count) in enumerate(entries):
        struct.pack_into("<B3xB3xII", disk, 446 + 16 * slot, 0, kind, first, count)
    disk[510:512] = b"\x55\xaa"
    return io.BytesIO(bytes(disk))


def ebr(disk: io.BytesIO, at: int, logical: tuple[int, int, int], following: int) -> None:
    data = bytearray(disk.getvalue())
    struct.pack_into("<B3xB3xII", data, at * SECTOR + 446, 0, *logical)
    if following:
        struct.pack_into("<B3xB3xII", data, at * SECTOR + 462, 0, 5, following, 2048)
    data[at * SECTOR + 510 : at * SECTOR + 512] = b"\x55\xaa"
    disk.seek(0)
    disk.write(bytes(data))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([(0x83, 2048, 16384 * 2)], "past the end of the disk"),
        ([(0x83, 2048, 4096), (0x83, 4096, 4096)], "partitions 1 and 2 overlap"),
        ([(0x83, 2048, 0)], "size of zero"),
        ([(0x83, 0, 2048)], "starts inside the partition table"),
        ([(0x05, 2048, 4096), (0x0F, 8192, 4096)], "second extended partition"),
        ([(0x05, 2048, 8192), (0x83, 4096, 2048)], "overlaps the extended partition"),
    ],
    ids=["past-end", "overlap", "zero-size", "inside-table", "two-extended", "primary-in-extended"],
)
def test_malformed_mbr_entries_refuse_the_table(
    entries: list[tuple[int, int, int]], message: str
) -> None:
    with pytest.raises(PartitionTableInvalid, match=message):
        read_table(mbr(entries), 8 * MiB)


def test_logical_partition_outside_its_extended_is_refused() -> None:
    disk = mbr([(0x05, 2048, 4096)])
    ebr(disk, 2048, (0x83, 2048, 8192), 0)  # 8192 sectors from inside a 4096-sector container
    with pytest.raises(PartitionTableInvalid, match="logical partition 5 lies outside"):
        read_table(disk, 8 * MiB)


def test_a_looping_chain_of_logical_partitions_is_refused() -> None:
    disk = mbr([(0x05, 2048, 8192)])
    ebr(disk, 2048, (0x83, 1, 1000), 2048)  # the next EBR is 2048 sectors in
    ebr(disk, 4096, (0x83, 1, 1000), 1)  # ... and that one points back near the start
    with pytest.raises(PartitionTableInvalid, match="points backwards"):
        read_table(disk, 8 * MiB)


def test_logical_partitions_follow_the_chain() -> None:
    disk = mbr([(0x83, 2048, 2048), (0x05, 4096, 8192)])
    ebr(disk, 4096, (0x83, 1, 2000), 2048)
    ebr(disk, 6144, (0x82, 1, 2000), 0)
    assert as_numbers(read_table(disk, 8 * MiB)) == [
        (1, 2048, 2048),
        (5, 4097, 2000),
        (6, 6145, 2000),
    ]


def test_fat_boot_sector_is_not_a_table() -> None:
    disk = bytearray(mbr([(0x83, 2048, 2048)]).getvalue())
    disk[446] = 0x4E  # boot code where a status byte would be
    assert read_table(io.BytesIO(bytes(disk)), 8 * MiB).label == "none"


# -- hostile GPTs ----------------------------------------------------------------------------------


def gpt_disk(tmp_path: Path) -> Path:
    disk = tmp_path / "gpt"
    sfdisk(
        disk,
        "label: gpt\npart1 : size=4MiB, type=21686148-6449-6E6F-744E-656564454649\n"
        "part2 : size=16MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        size=32 * MiB,
    )
    return disk


def rewrite_entry(disk: Path, index: int, first: int, last: int, lba: int = 1) -> None:
    """Change one GPT entry at the header at `lba` and fix the checksums, as an attacker would."""
    with open(disk, "r+b") as handle:
        handle.seek(lba * SECTOR)
        header = bytearray(handle.read(SECTOR))
        entries_lba, count, size = struct.unpack_from("<QII", header, 72)
        handle.seek(entries_lba * SECTOR)
        array = bytearray(handle.read(count * size))
        struct.pack_into("<QQ", array, index * size + 32, first, last)
        struct.pack_into("<I", header, 88, zlib.crc32(array))
        struct.pack_into("<I", header, 16, 0)
        (header_size,) = struct.unpack_from("<I", header, 12)
        struct.pack_into("<I", header, 16, zlib.crc32(header[:header_size]))
        handle.seek(entries_lba * SECTOR)
        handle.write(array)
        handle.seek(lba * SECTOR)
        handle.write(header)


def test_gpt_entry_past_the_end_is_refused_even_with_valid_checksums(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path)
    last_lba = disk.stat().st_size // SECTOR - 1
    for lba in (1, last_lba):  # both copies, so the backup cannot stand in
        rewrite_entry(disk, 1, 10240, 10_000_000, lba=lba)
    with pytest.raises(PartitionTableInvalid, match="partition 2"):
        table_of(disk)


def test_gpt_overlapping_entries_are_refused(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path)
    last_lba = disk.stat().st_size // SECTOR - 1
    for lba in (1, last_lba):
        rewrite_entry(disk, 1, 4096, 20000, lba=lba)  # starts inside partition 1
    with pytest.raises(PartitionTableInvalid, match="partitions 1 and 2 overlap"):
        table_of(disk)


def test_gpt_with_a_corrupt_primary_header_is_read_from_its_backup(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path)
    expected = table_of(disk)
    with open(disk, "r+b") as handle:
        handle.seek(SECTOR + 40)
        handle.write(b"\xff" * 8)  # first usable LBA, without fixing the checksum
    assert table_of(disk) == expected


def test_gpt_with_both_headers_corrupt_is_refused(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path)
    size = disk.stat().st_size
    with open(disk, "r+b") as handle:
        for lba in (1, size // SECTOR - 1):
            handle.seek(lba * SECTOR + 40)
            handle.write(b"\xff" * 8)
    with pytest.raises(PartitionTableInvalid, match="checksum"):
        table_of(disk)


# -- choosing --------------------------------------------------------------------------------------


def part(number: int, size: int, linux: bool) -> Partition:
    return Partition(number=number, offset=number * MiB, size=size, type="x", linux=linux)


def test_auto_takes_the_only_linux_partition_even_when_it_is_smaller() -> None:
    table = PartitionTable("gpt", (part(1, 100 * MiB, False), part(2, 10 * MiB, True)))
    chosen = choose(table, "auto", GiB)
    assert chosen is not None and chosen.number == 2


def test_auto_takes_the_largest_linux_then_the_largest_of_all() -> None:
    linux = PartitionTable(
        "mbr", (part(1, 5 * MiB, True), part(2, 50 * MiB, False), part(5, 9 * MiB, True))
    )
    other = PartitionTable("mbr", (part(1, 5 * MiB, False), part(2, 50 * MiB, False)))
    assert (choose(linux, "auto", GiB) or part(0, 0, False)).number == 5
    assert (choose(other, "auto", GiB) or part(0, 0, False)).number == 2


def test_auto_and_none_on_a_disk_without_table_mean_the_whole_disk() -> None:
    assert choose(PartitionTable("none", ()), "auto", GiB) is None
    assert choose(PartitionTable("mbr", (part(1, MiB, True),)), "none", GiB) is None


def test_a_missing_partition_is_named_with_what_the_disk_has() -> None:
    table = PartitionTable("mbr", (part(1, MiB, True), part(5, MiB, True)))
    with pytest.raises(PartitionNotFound) as error:
        choose(table, 3, GiB, disk="vm-1/disk")
    assert str(error.value) == (
        f"partition 3 not found on vm-1/disk: it ({GiB} bytes) has MBR partitions 1, 5"
    )
    with pytest.raises(PartitionNotFound, match="has no partition table"):
        choose(PartitionTable("none", ()), 1, GiB)


def test_linux_types_include_the_filesystem_data_guid() -> None:
    assert uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4") in LINUX_GPT_TYPES


GiB = 2**30
