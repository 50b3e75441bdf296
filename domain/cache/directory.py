"""The shared base-image cache directory: `<cache_dir>/<key>` plus a `<key>.json` record beside it.

The key is a hash of the image id, never a name the caller controls; an entry counts only while
its record describes the very file beside it (size and inode). Entries appear by rename
(domain.core.publish), so looking one up needs no lock. domain.cache.fetch puts entries here,
domain.cache.eviction removes them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
from pydantic import ValidationError

from domain.core.errors import BaseImageMissing, ChecksumMismatch, InvalidRequest
from domain.core.models import CachedImage, ImageSource, WireModel
from domain.core.publish import PART, RECORD_PART, FileStamp, record_path

log = structlog.get_logger(__name__)

CONVERTED = "converted"  # the temporary kind of a conversion to raw
CACHE_TEMPORARIES = (PART, RECORD_PART, CONVERTED)  # every temporary beside a cache entry
_KEY = re.compile(r"[0-9a-f]{40}")


def cache_key(image_id: str) -> str:
    """The cache file name for an image: sha1 of its id, as Nova names `_base` files."""
    return hashlib.sha1(image_id.encode("utf-8"), usedforsecurity=False).hexdigest()


class CacheRecord(WireModel):
    """What is known about a cache entry, written beside it as `<key>.json`."""

    image: CachedImage
    source: str
    source_format: str
    source_bytes: int
    fence: int
    fetched_at: datetime
    file: FileStamp | None = None  # None only in records written before files were stamped


@dataclass(frozen=True)
class ImageCache:
    """The cache directory and how entries are named in it."""

    root: Path

    def entry(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str) -> CacheRecord | None:
        """The record of a complete entry: it reads, and it describes the file beside it; None
        when there is no such entry (nothing, or a broken one that the next holder repairs)."""
        entry = self.entry(key)
        try:
            text = record_path(entry).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            record = CacheRecord.model_validate_json(text)
        except ValidationError:
            log.warning("cache_record_unreadable", key=key)
            return None
        matches = entry.is_file() if record.file is None else record.file.matches(entry)
        if not matches or record.image.key != key:
            log.warning("cache_record_mismatched", key=key, image_exists=entry.exists())
            return None
        return record

    def image(self, key: str) -> CachedImage | None:
        """The complete entry `key` as a CachedImage whose path is derived from the key, never
        taken from a record or a message; InvalidRequest for a name that is not a cache key."""
        if not _KEY.fullmatch(key):
            raise InvalidRequest(f"{key!r} is not a cache key (40 hexadecimal digits)")
        record = self.lookup(key)
        if record is None:
            return None
        return record.image.model_copy(update={"path": str(self.entry(key))})


def find_cached(source: ImageSource, cache: ImageCache) -> CachedImage | None:
    """The cache entry of `source` if it is complete (no lock: entries appear by rename);
    ChecksumMismatch when it is cached with another checksum than the request names."""
    image = cache.image(cache_key(source.image_id))
    if image is None:
        return None
    _check_cached_checksum(image, source)
    return image


def cached_base(source: ImageSource, claimed: CachedImage, cache: ImageCache) -> CachedImage:
    """The cache entry a disk step uses: the one of the request's image, found by its key in
    the cache directory, with its record checked. The step's input (`claimed`, from the
    message) names the key only; its path and format are never used."""
    key = cache_key(source.image_id)
    if claimed.key != key:
        raise InvalidRequest(
            f"the cached image {claimed.key} is not the entry of image {source.image_id} ({key})"
        )
    image = find_cached(source, cache)
    if image is None:
        raise BaseImageMissing(
            f"base image {source.image_id} ({key}) is not in the cache; "
            "send the request again to fetch it"
        )
    return image


def _check_cached_checksum(image: CachedImage, source: ImageSource) -> None:
    if source.checksum is not None and source.checksum != f"sha256:{image.source_sha256}":
        raise ChecksumMismatch(
            f"image {source.image_id} is cached with sha256:{image.source_sha256}, "
            f"the request expected {source.checksum}"
        )
