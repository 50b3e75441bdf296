"""The shared base-image cache: `<cache_dir>/<key>` plus a `<key>.json` record beside it.

`fetch_to_cache` downloads an image once however many workers ask for it at once: the entry
is looked up, then produced under the lease lock `cache:<key>`, verified (checksum, format
inspection, qemu-img info with the format pinned), optionally converted to raw, and published
(domain.core.publish: the record, then the image, each renamed into place without replacing
anything).
The key is a hash of the image id, never a name the caller controls; an entry counts only while
its record describes the very file beside it (size and inode).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import ValidationError

from domain.cache.download import SourcePolicy, download
from domain.core.errors import (
    BaseImageMissing,
    ChecksumMismatch,
    ImageRefused,
    ImageTooLarge,
    InvalidRequest,
)
from domain.core.models import CachedImage, ImageSource, WireModel
from domain.core.ports import LockFactory, Progress, no_progress
from domain.core.publish import (
    PART,
    RECORD_PART,
    FileStamp,
    Staged,
    publish_once,
    record_path,
    temporary_path,
)
from domain.core.runner import Limits, Runner
from domain.core.urls import redact
from domain.formats import qemu_img
from domain.formats.conversion import cache_mode_for
from domain.formats.inspection import Inspection, inspect_image, verify_info

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


@dataclass(frozen=True)
class FetchOptions:
    """How fetch_to_cache treats an image: what it may download, and whether to make it raw."""

    policy: SourcePolicy
    limits: Limits
    force_raw: bool = True


def fetch_to_cache(
    source: ImageSource,
    *,
    cache: ImageCache,
    options: FetchOptions,
    runner: Runner,
    locks: LockFactory,
    progress: Progress = no_progress,
) -> CachedImage:
    """Make sure the image is in the cache and return its entry."""
    key = cache_key(source.image_id)
    entry = cache.entry(key)

    def find() -> CachedImage | None:
        return find_cached(source, cache)

    def stage(part: Path) -> Staged[CachedImage]:
        log.info("image_download_started", source=redact(source.url))
        fetched = download(source.url, part, options.policy, progress)
        if source.checksum is not None and source.checksum != f"sha256:{fetched.sha256}":
            raise ChecksumMismatch(
                f"image {source.image_id} from {redact(source.url)} has sha256:{fetched.sha256}, "
                f"the request expected {source.checksum}"
            )
        inspected, info = _inspect(part, source, options, runner)
        published, fmt = part, inspected.format
        if options.force_raw and fmt != "raw":
            published = temporary_path(entry, CONVERTED, lease.fence)
            qemu_img.convert(
                runner,
                part,
                published,
                source_format=fmt,
                target_format="raw",
                cache_mode=cache_mode_for(cache.root),
                needed=info.virtual_size,
                on_progress=lambda percent: progress(
                    int(info.virtual_size * percent / 100), info.virtual_size
                ),
            )
            part.unlink()
            fmt = "raw"
            log.info("image_converted", source_format=inspected.format, format=fmt)
        image = CachedImage(
            key=key,
            image_id=source.image_id,
            path=str(entry),
            format=fmt,
            virtual_size=info.virtual_size,
            source_sha256=fetched.sha256,
        )
        record = CacheRecord(
            image=image,
            source=redact(source.url),
            source_format=inspected.format,
            source_bytes=fetched.size,
            fence=lease.fence,
            fetched_at=datetime.now(UTC),
            file=FileStamp.of(published),
        )
        log.info("image_fetched", bytes=fetched.size, format=inspected.format, cached_format=fmt)
        return Staged(file=published, result=image, record=record.model_dump_json(indent=1))

    lease = locks(f"cache:{key}")
    return publish_once(
        entry,
        find=find,
        lease=lease,
        stage=stage,
        with_record=True,
        extra_temporaries=(CONVERTED,),
    )


def _inspect(
    part: Path, source: ImageSource, options: FetchOptions, runner: Runner
) -> tuple[Inspection, qemu_img.ImageInfo]:
    """Inspect the downloaded bytes, then ask qemu-img with the format pinned, under limits."""
    try:
        inspected = inspect_image(part, source.declared_format)
        info = qemu_img.info(runner, part, inspected.format, options.limits)
        verify_info(info, inspected)
    except ImageRefused as error:
        log.warning("image_refused", reason=str(error), declared=source.declared_format)
        raise ImageRefused(
            f"image {source.image_id} from {redact(source.url)} is refused: {error}"
        ) from None
    if info.virtual_size > options.policy.max_image_bytes:
        raise ImageTooLarge(
            f"image {source.image_id} has a virtual size of {info.virtual_size} bytes, over the "
            f"limit of {options.policy.max_image_bytes} bytes (fetch.max_image_bytes)"
        )
    return inspected, info


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


def read_records(cache: ImageCache) -> list[CacheRecord]:
    """Every readable record in the cache, for listing."""
    records = []
    for sidecar in sorted(cache.root.glob("*.json")):
        record = cache.lookup(sidecar.name.removesuffix(".json"))
        if record is not None:
            records.append(record)
    return records
