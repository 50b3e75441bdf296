"""imgprep.create_overlay: the instance disk as a qcow2 overlay on the cached base.

The base is the cache entry of the request's image, found by its key in the cache directory
(domain.cache.fetch.cached_base): a path or format in the message is never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from domain.cache.fetch import cache_key, cached_base
from domain.cache.references import base_in_use, disk_holder, pending_holder
from domain.core.models import CachedImage, PreparedDisk, PrepareRequest
from domain.disks.overlay import create_overlay, overlay_uses_base
from worker.app import app
from worker.runtime import runtime
from worker.taskbase import StepTask, parse


@app.task(name="imgprep.create_overlay", base=StepTask, bind=True)
def overlay(self: StepTask, fetched: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    parsed = parse(PrepareRequest, request)
    claimed = parse(CachedImage, fetched, "cached image")
    spec = parsed.disk
    key = cache_key(parsed.image.image_id)
    structlog.contextvars.bind_contextvars(image_key=key)
    current = runtime()
    host = current.settings.host_id
    disk_path = Path(current.settings.instances_dir, spec.instance_id, spec.disk_name)

    def uses_base(base: CachedImage) -> bool:
        return overlay_uses_base(disk_path, base, current.runner, current.qemu_limits)

    with base_in_use(
        key,
        lambda: cached_base(parsed.image, claimed, current.cache),
        holder=disk_holder(host, spec.instance_id, spec.disk_name),
        uses_base=uses_base,
        pin=pending_holder(self.request.root_id or self.request.id),
        locks=current.locks,
        references=current.references,
        final_attempt=self.request.retries >= current.settings.retry.max_retries,
    ) as base:
        disk = create_overlay(
            base,
            spec,
            instances_dir=current.settings.instances_dir,
            host=host,
            runner=current.runner,
            locks=current.locks,
            limits=current.qemu_limits,
            preallocate_space=current.settings.preallocate_images == "space",
        )
    return PreparedDisk(disk=disk, base=base).model_dump(mode="json")
