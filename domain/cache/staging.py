"""Verified bytes staged as a cache entry: what every way of fetching an image shares.

Whether the bytes came from the origin (domain.cache.fetch), from peers (domain.cache.fleet) or
are about to be imported into a Ceph cluster (domain.rbd.images), they are checked against the
request's checksum (`check_checksum`), inspected (format inspector, then qemu-img info with the
format pinned: `inspect_verified`), converted to raw when the options ask for it, and staged with
their record (`stage_entry`) for domain.core.publish to rename into place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from domain.cache.directory import CONVERTED, CacheRecord, ImageCache, cache_key
from domain.cache.download import SourcePolicy
from domain.core.errors import ChecksumMismatch, ImageRefused, ImageTooLarge
from domain.core.models import CachedImage, ImageSource
from domain.core.ports import Progress, no_progress
from domain.core.publish import FileStamp, Staged, temporary_path
from domain.core.runner import Limits, Runner
from domain.core.urls import redact
from domain.formats import qemu_img
from domain.formats.conversion import cache_mode_for
from domain.formats.inspection import Inspection, inspect_image, verify_info

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FetchOptions:
    """How fetch_to_cache treats an image: what it may download, and whether to make it raw."""

    policy: SourcePolicy
    limits: Limits
    force_raw: bool = True


def check_checksum(source: ImageSource, sha256: str) -> None:
    """ChecksumMismatch unless the bytes have the checksum the request names (if it does)."""
    if source.checksum is not None and source.checksum != f"sha256:{sha256}":
        raise ChecksumMismatch(
            f"image {source.image_id} from {redact(source.url)} has sha256:{sha256}, "
            f"the request expected {source.checksum}"
        )


@dataclass(frozen=True)
class Verified:
    """Bytes on disk whose digest was checked: the source's as served (a download, or a peer's
    copy of them), or a peer's copy of a published entry (`source_*` then describe the source
    the verifying host downloaded)."""

    sha256: str
    size: int
    declared_format: str
    shown_source: str
    source_sha256: str | None = None  # None: these bytes are the source's
    source_size: int | None = None
    source_format: str | None = None


def stage_entry(
    part: Path,
    verified: Verified,
    *,
    source: ImageSource,
    entry: Path,
    fence: int,
    cache: ImageCache,
    options: FetchOptions,
    runner: Runner,
    progress: Progress = no_progress,
) -> Staged[CachedImage]:
    """Inspect verified bytes as today (format inspector, then qemu-img info with the format
    pinned), convert them to raw with force_raw, and stage the entry with its record. Whatever
    the bytes came from, the source they stand for must have the request's checksum: nothing
    the checksum rejects is ever staged, so nothing it rejects is ever published."""
    check_checksum(source, verified.source_sha256 or verified.sha256)
    inspected, info = inspect_verified(part, source, verified, options, runner)
    published, fmt = part, inspected.format
    if options.force_raw and fmt != "raw":
        published = temporary_path(entry, CONVERTED, fence)
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
        key=cache_key(source.image_id),
        image_id=source.image_id,
        path=str(entry),
        format=fmt,
        virtual_size=info.virtual_size,
        source_sha256=verified.source_sha256 or verified.sha256,
    )
    record = CacheRecord(
        image=image,
        source=verified.shown_source,
        source_format=verified.source_format or inspected.format,
        source_bytes=verified.source_size or verified.size,
        fence=fence,
        fetched_at=datetime.now(UTC),
        file=FileStamp.of(published),
    )
    log.info("image_fetched", bytes=verified.size, format=inspected.format, cached_format=fmt)
    return Staged(file=published, result=image, record=record.model_dump_json(indent=1))


def inspect_verified(
    part: Path, source: ImageSource, verified: Verified, options: FetchOptions, runner: Runner
) -> tuple[Inspection, qemu_img.ImageInfo]:
    """Inspect the downloaded bytes, then ask qemu-img with the format pinned, under limits."""
    declared = verified.declared_format
    try:
        inspected = inspect_image(part, declared)
        info = qemu_img.info(runner, part, inspected.format, options.limits)
        verify_info(info, inspected)
    except ImageRefused as error:
        log.warning("image_refused", reason=str(error), declared=declared)
        raise ImageRefused(
            f"image {source.image_id} from {verified.shown_source} is refused: {error}"
        ) from None
    if info.virtual_size > options.policy.max_image_bytes:
        raise ImageTooLarge(
            f"image {source.image_id} has a virtual size of {info.virtual_size} bytes, over the "
            f"limit of {options.policy.max_image_bytes} bytes (fetch.max_image_bytes)"
        )
    return inspected, info
