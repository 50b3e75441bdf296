"""The fetch step: an image into the shared cache (domain.cache.directory), downloaded once.

`fetch_image` downloads an image once however many workers ask for it at once: the entry is
looked up, then produced under the lease lock `cache:<key>`, verified (checksum, format
inspection, qemu-img info with the format pinned), optionally converted to raw (both
domain.cache.staging, which the fleet's fetch shares), and published
(domain.core.publish: the record, then the image, each renamed into place without replacing
anything). `fetch_to_cache`, the step, also pins the entry for the canvas until its disk
references it (domain.cache.references).
"""

from __future__ import annotations

from pathlib import Path

import structlog

from domain.cache.directory import CONVERTED, ImageCache, cache_key, find_cached
from domain.cache.download import download
from domain.cache.fleet import Fleet
from domain.cache.fleet import fetch_image as fleet_fetch_image
from domain.cache.ports import References
from domain.cache.references import fetch_pinned
from domain.cache.staging import FetchOptions, Verified, check_checksum, stage_entry
from domain.core.models import CachedImage, ImageSource
from domain.core.ports import LockFactory, Progress, no_progress
from domain.core.publish import Staged, publish_once
from domain.core.runner import Runner
from domain.core.urls import redact

log = structlog.get_logger(__name__)


def fetch_to_cache(
    source: ImageSource,
    pin: str,
    *,
    cache: ImageCache,
    options: FetchOptions,
    runner: Runner,
    locks: LockFactory,
    references: References,
    progress: Progress = no_progress,
    fleet: Fleet | None = None,
) -> CachedImage:
    """The image's cache entry, fetched if it is not there, and pinned for the canvas (`pin`,
    domain.cache.references.pending_holder) until its disk references it; fetched again if it
    was removed in between. With `fleet` (host scope) the entry is this host's, taken from
    peers or the origin (domain.cache.fleet)."""
    structlog.contextvars.bind_contextvars(image_key=cache_key(source.image_id))

    def fetch() -> CachedImage:
        if fleet is None:
            return fetch_image(
                source, cache=cache, options=options, runner=runner, locks=locks, progress=progress
            )
        return fleet_fetch_image(
            source,
            cache=cache,
            options=options,
            runner=runner,
            locks=locks,
            fleet=fleet,
            progress=progress,
        )

    return fetch_pinned(fetch, pin, locks=locks, references=references)


def fetch_image(
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
        check_checksum(source, fetched.sha256)
        return stage_entry(
            part,
            Verified(
                sha256=fetched.sha256,
                size=fetched.size,
                declared_format=source.declared_format,
                shown_source=redact(source.url),
            ),
            source=source,
            entry=entry,
            fence=lease.fence,
            cache=cache,
            options=options,
            runner=runner,
            progress=progress,
        )

    lease = locks(f"cache:{key}")
    return publish_once(
        entry,
        find=find,
        lease=lease,
        stage=stage,
        with_record=True,
        extra_temporaries=(CONVERTED,),
    )
