"""imgprep.create_overlay: the instance disk as a qcow2 overlay on the cached base
(domain.disks.instance_disks)."""

from __future__ import annotations

from typing import Any

from domain.core.models import CachedImage, PrepareRequest
from domain.disks import instance_disks
from worker.app import app
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, canvas_pin, parse


@app.task(name="imgprep.create_overlay", base=StepTask, bind=True)
def create_overlay(
    self: StepTask, fetched: dict[str, Any], request: dict[str, Any]
) -> dict[str, Any]:
    prepared = instance_disks.create_overlay(
        parse(PrepareRequest, request),
        parse(CachedImage, fetched, "cached image"),
        runtime().disk_context,
        pin=canvas_pin(self),
        final_attempt=self.final_attempt,
    )
    return prepared.model_dump(mode="json")
