"""imgprep.copy_raw_disk: the instance disk as a sparse raw copy of the cached base.

The base is the cache entry of the request's image, found by its key in the cache directory
(domain.cache.fetch.cached_base): a path or format in the message is never used.
"""

from __future__ import annotations

from typing import Any

import structlog

from domain.cache.fetch import cache_key, cached_base
from domain.cache.references import base_in_use, pending_holder
from domain.core.models import CachedImage, PreparedDisk, PrepareRequest
from domain.disks.raw_disk import copy_raw_disk
from worker.app import app
from worker.runtime import runtime
from worker.taskbase import StepTask, parse


@app.task(name="imgprep.copy_raw_disk", base=StepTask, bind=True)
def raw_disk(self: StepTask, fetched: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    parsed = parse(PrepareRequest, request)
    claimed = parse(CachedImage, fetched, "cached image")
    spec = parsed.disk
    key = cache_key(parsed.image.image_id)
    structlog.contextvars.bind_contextvars(image_key=key)
    current = runtime()
    # A raw disk does not reference its base once copied: the canvas's pin protects the base
    # from the cache manager while it is copied, and goes with the copy.
    with base_in_use(
        key,
        lambda: cached_base(parsed.image, claimed, current.cache),
        holder=None,
        uses_base=lambda base: False,
        pin=pending_holder(self.request.root_id or self.request.id),
        locks=current.locks,
        references=current.references,
        final_attempt=self.request.retries >= current.settings.retry.max_retries,
    ) as base:
        disk = copy_raw_disk(
            base,
            spec,
            instances_dir=current.settings.instances_dir,
            host=current.settings.host_id,
            runner=current.runner,
            locks=current.locks,
            limits=current.qemu_limits,
            preallocate_space=current.settings.preallocate_images == "space",
        )
    return PreparedDisk(disk=disk, base=base).model_dump(mode="json")
