"""What is in the image cache and who uses it: entries with their sizes, last use and holders,
and the instance disks of this host that have a cached base as backing file.

The last use of an entry is its file's mtime, touched whenever a canvas fetches or references
it (Nova's image cache manager reads ages the same way). The backing files of local disks come
from `qemu-img info` (format pinned to qcow2, after checking the qcow2 magic), never from names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from tasks import qemu_img
from tasks.cache import CONVERTED, CacheRecord, ImageCache
from tasks.errors import ImgprepError
from tasks.ports import References
from tasks.publish import PART, SIDECAR
from tasks.runner import Limits, Runner

log = structlog.get_logger(__name__)

QCOW2_MAGIC = b"QFI\xfb"
NOT_ENTRIES = (PART, CONVERTED, SIDECAR)


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
        if not name.endswith(NOT_ENTRIES)
        and not name.startswith(".")
        and (cache.root / name).is_file()
        and not (cache.root / name).is_symlink()
    )


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

    Every qcow2 file under `<instances_dir>/<instance>/` counts, temporaries too: a disk being
    created already uses its base. Raises UnverifiableDisk when a qcow2 cannot be inspected."""
    used: dict[str, list[Path]] = {}
    for disk in _instance_files(instances_dir):
        if not _is_qcow2(disk):
            continue
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


def _instance_files(instances_dir: Path) -> list[Path]:
    files = []
    try:
        instances = list(instances_dir.iterdir())
    except FileNotFoundError:
        return []
    for instance in instances:
        if instance.is_symlink() or not instance.is_dir():
            continue
        files += [p for p in instance.iterdir() if p.is_file() and not p.is_symlink()]
    return sorted(files)


def _is_qcow2(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == QCOW2_MAGIC
    except OSError:
        return False
