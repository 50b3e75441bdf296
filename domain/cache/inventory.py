"""What is in the image cache and who uses it: entries with their sizes, last use and holders,
and the instance disks of this host that have a cached base as backing file.

The last use of an entry is its file's mtime, touched whenever a canvas fetches or references
it (Nova's image cache manager reads ages the same way). Which local disks have a backing file
comes from imgprep's own records, never from bytes a guest can write: only a disk that its
instance's disk.info records as qcow2 (an overlay imgprep created, whose header the guest cannot
touch) is asked with `qemu-img info -f qcow2`; a disk recorded as raw has no backing file, and a
file without a record is not a disk of imgprep's. A disk being created is not read either: its
base holds its reference from before the disk is made (domain.cache.references).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from domain.cache.directory import CacheRecord, ImageCache
from domain.cache.ports import References
from domain.core import diskinfo
from domain.core.errors import DiskConflict, ImgprepError
from domain.core.publish import RECORD, is_temporary_name
from domain.core.runner import Limits, Runner
from domain.formats import qemu_img

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EntryState:
    """One cache entry as the cache manager sees it."""

    key: str
    path: Path
    record: CacheRecord | None  # None: a file without a readable record (orphaned)
    size_on_disk: int
    last_used: float
    holders: dict[str, float]

    @property
    def image_id(self) -> str | None:
        return self.record.image.image_id if self.record else None


def entry_keys(cache: ImageCache) -> list[str]:
    """Names of the files in the cache that are entries (not records, not temporaries)."""
    try:
        names = os.listdir(cache.root)
    except FileNotFoundError:
        return []
    return sorted(
        name
        for name in names
        if not name.endswith(RECORD)
        and not is_temporary_name(name)
        and not name.startswith(".")
        and (cache.root / name).is_file()
        and not (cache.root / name).is_symlink()
    )


def leftover_keys(cache: ImageCache) -> list[str]:
    """Keys with something left beside them that is no entry: temporaries (of a holder that
    died, or whose lease passed on after it had renamed), or a record without its file."""
    try:
        names = set(os.listdir(cache.root))
    except FileNotFoundError:
        return []
    keys = {name.split(".", 1)[0] for name in names if is_temporary_name(name)}
    keys |= {
        name.removesuffix(RECORD)
        for name in names
        if name.endswith(RECORD) and name.removesuffix(RECORD) not in names
    }
    return sorted(key for key in keys if key and not key.startswith("."))


def read_entry(cache: ImageCache, key: str, references: References) -> EntryState | None:
    """The entry `key` as it is now, or None when it is gone."""
    path = cache.entry(key)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return EntryState(
        key=key,
        path=path,
        record=cache.lookup(key),
        size_on_disk=stat.st_blocks * 512,
        last_used=stat.st_mtime,
        holders=references.holders(key),
    )


def read_entries(cache: ImageCache, references: References) -> list[EntryState]:
    entries = (read_entry(cache, key, references) for key in entry_keys(cache))
    return [entry for entry in entries if entry is not None]


class UnverifiableDisk(ImgprepError):
    """A local instance disk could not be inspected, so what it uses is unknown."""


def local_backing_files(
    instances_dir: Path, runner: Runner, limits: Limits
) -> dict[str, list[Path]]:
    """Backing file (as recorded in the disk, and resolved) → the local disks that use it.

    Only disks recorded as qcow2 in their instance's disk.info are read. Raises
    UnverifiableDisk when a record or a recorded overlay cannot be read."""
    used: dict[str, list[Path]] = {}
    for disk in _recorded_overlays(instances_dir):
        try:
            info = qemu_img.info(runner, disk, "qcow2", limits)
        except FileNotFoundError:
            continue
        except ImgprepError as error:
            if not disk.exists():
                continue  # deleted while we looked
            raise UnverifiableDisk(f"cannot inspect {disk}: {error}") from None
        for name in {info.backing_filename, info.full_backing_filename} - {None}:
            assert name is not None
            for form in {name, os.path.realpath(name)}:
                used.setdefault(form, []).append(disk)
    return used


def _recorded_overlays(instances_dir: Path) -> list[Path]:
    """The regular files that disk.info records as qcow2 disks, in every instance directory."""
    disks = []
    try:
        instances = list(instances_dir.iterdir())
    except FileNotFoundError:
        return []
    for instance in instances:
        if instance.is_symlink() or not instance.is_dir():
            continue
        try:
            formats = diskinfo.read_formats(instance)
        except DiskConflict as error:
            raise UnverifiableDisk(str(error)) from None
        except FileNotFoundError:
            continue  # the instance went while we looked
        disks += [
            instance / name
            for name, fmt in formats.items()
            if fmt == "qcow2" and _is_regular_file(instance / name)
        ]
    return sorted(disks)


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return False
