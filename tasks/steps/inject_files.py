"""imgprep.inject_files: write the request's files into the mounted guest filesystem."""

from __future__ import annotations

from typing import Any

from domain.core.models import PrepareRequest
from domain.guest import injection
from domain.guest.context import MountedDisk
from worker.app import app
from worker.app.device_steps import device_context
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.inject_files", base=StepTask, bind=True)
def inject_files(
    self: StepTask, mounted: dict[str, Any], request: dict[str, Any], operation: str
) -> dict[str, Any]:
    disk = parse(MountedDisk, mounted, "mounted disk")
    parsed = parse(PrepareRequest, request)
    with device_context(self, parsed, operation) as ctx:
        return injection.inject_files(disk, parsed.inject, ctx).model_dump(mode="json")
