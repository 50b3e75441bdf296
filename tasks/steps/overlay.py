"""imgprep.create_overlay: the instance disk as a qcow2 overlay on the cached base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from tasks.models import CachedImage, PreparedDisk, PrepareRequest
from tasks.overlay import create_overlay
from tasks.references import base_in_use, disk_holder, pending_holder
from worker.app import app
from worker.runtime import runtime
from worker.taskbase import StepTask, parse


@app.task(name="imgprep.create_overlay", base=StepTask, bind=True)
def overlay(self: StepTask, fetched: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    base = parse(CachedImage, fetched, "cached image")
    spec = parse(PrepareRequest, request).disk
    structlog.contextvars.bind_contextvars(image_key=base.key)
    current = runtime()
    host = current.settings.host_id
    with base_in_use(
        base,
        holder=disk_holder(host, spec.instance_id, spec.disk_name),
        disk_path=Path(current.settings.instances_dir, spec.instance_id, spec.disk_name),
        pin=pending_holder(self.request.root_id or self.request.id),
        locks=current.locks,
        references=current.references,
        final_attempt=self.request.retries >= current.settings.retry.max_retries,
    ):
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
