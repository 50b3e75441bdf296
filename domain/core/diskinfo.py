"""Format pinning of instance disks, as Nova's disk.info.

When a disk is created its format is recorded in `<instances_dir>/<instance_id>/disk.info`, a
JSON object of disk name → format. Later steps read the record and pin that format (`-f`)
instead of probing the file: a guest can write a qcow2 header into a raw disk, and a probe
would then follow whatever backing file the guest named. The file is rewritten atomically by
holders of the instance's lease `disk:<instance_id>` (`instance_lease`), the lease under which
the instance's disks are created and deleted, so one lease covers a disk and its record. Each
holder writes through a temporary of its own (`disk.info.part.<fence>`) and removes the ones
that holders before it left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast, get_args

import structlog

from domain.core.errors import DiskConflict, DiskNotFound
from domain.core.fileops import fsync_directory, remove_files, write_atomically
from domain.core.models import DiskFormat
from domain.core.ports import Lease
from domain.core.publish import PART, stale_temporaries, temporary_path

log = structlog.get_logger(__name__)

DISK_INFO = "disk.info"
FORMATS = frozenset(get_args(DiskFormat))


def disk_info_path(directory: Path) -> Path:
    """The record of the disks in one instance directory."""
    return directory / DISK_INFO


def instance_lease(instance_id: str) -> str:
    """The lease that guards the disks of one instance and their disk.info."""
    return f"disk:{instance_id}"


def read_formats(directory: Path) -> dict[str, DiskFormat]:
    """Every recorded disk of the instance directory and its format (empty when none)."""
    path = disk_info_path(directory)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
    except ValueError as error:
        raise DiskConflict(f"{path} is not valid JSON ({error}); repair or remove it") from None
    if not isinstance(data, dict) or not all(
        isinstance(name, str) and value in FORMATS for name, value in data.items()
    ):
        raise DiskConflict(f"{path} does not map disk names to raw or qcow2; repair or remove it")
    return cast(dict[str, DiskFormat], data)


def read_format(directory: Path, disk_name: str) -> DiskFormat | None:
    """The recorded format of one disk, or None when it has no record."""
    return read_formats(directory).get(disk_name)


def require_format(directory: Path, disk_name: str) -> DiskFormat:
    """The recorded format of an existing disk; DiskNotFound when the disk or record is missing."""
    if not (directory / disk_name).is_file():
        raise DiskNotFound(f"there is no disk {directory / disk_name}")
    recorded = read_format(directory, disk_name)
    if recorded is None:
        raise DiskNotFound(
            f"{directory / disk_name} has no format record in {disk_info_path(directory)}; "
            "imgprep uses only disks it created"
        )
    return recorded


def record_format(directory: Path, disk_name: str, fmt: DiskFormat, held: Lease) -> None:
    """Record that `disk_name` is `fmt`, by the holder of the instance's lease (`held`).

    A record of another format is a conflict while its disk exists; the record of a disk that
    is gone (a crash before its rename) is replaced. The directory is not synced here: the
    caller renames the disk into the same directory next and syncs both at once.
    """
    formats = read_formats(directory)
    existing = formats.get(disk_name)
    if existing == fmt:
        return
    if existing is not None and (directory / disk_name).exists():
        raise DiskConflict(
            f"{directory / disk_name} is recorded as a {existing} disk; the request wants "
            f"{fmt}. Delete the disk first to recreate it"
        )
    formats[disk_name] = fmt
    held.ensure_held()
    _write(directory, formats, held)
    log.info("disk_format_recorded", disk=disk_name, format=fmt)


def forget_format(directory: Path, disk_name: str, held: Lease) -> None:
    """Remove the record of a deleted disk (the last one removes disk.info), by the holder of
    the instance's lease; the directory is synced."""
    formats = read_formats(directory)
    if formats.pop(disk_name, None) is None:
        return
    held.ensure_held()
    if formats:
        _write(directory, formats, held)
    else:
        remove_stale_temporaries(directory)
        disk_info_path(directory).unlink(missing_ok=True)
    fsync_directory(directory)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove what earlier holders left of their rewrites of disk.info (under the lease)."""
    return remove_files(stale_temporaries(disk_info_path(directory), (PART,)))


def _write(directory: Path, formats: dict[str, DiskFormat], held: Lease) -> None:
    remove_stale_temporaries(directory)
    path = disk_info_path(directory)
    text = json.dumps(formats, sort_keys=True) + "\n"
    write_atomically(path, text, temporary_path(path, PART, held.fence))
