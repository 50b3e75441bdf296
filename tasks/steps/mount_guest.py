"""imgprep.mount_guest: mount the guest filesystem on the disk's private directory."""

from __future__ import annotations

from typing import Any

from domain.core.models import PrepareRequest
from domain.guest import mounting
from domain.guest.context import MappedDisk
from worker.app import app
from worker.app.device_steps import device_context
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.mount_guest", base=StepTask, bind=True)
def mount_guest(
    self: StepTask, mapped: dict[str, Any], request: dict[str, Any], operation: str
) -> dict[str, Any]:
    disk = parse(MappedDisk, mapped, "mapped disk")
    parsed = parse(PrepareRequest, request)
    with device_context(self, parsed, operation) as ctx:
        return mounting.mount_guest(disk, ctx).model_dump(mode="json")
