"""imgprep.map_partitions: claim the instance disk, expose it, find the guest filesystem."""

from __future__ import annotations

from typing import Any

from domain.core.models import PreparedDisk, PrepareRequest
from domain.guest import mapping
from worker.app import app
from worker.app.device_steps import device_context
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.map_partitions", base=StepTask, bind=True)
def map_partitions(
    self: StepTask, prepared: dict[str, Any], request: dict[str, Any], operation: str
) -> dict[str, Any]:
    disk = parse(PreparedDisk, prepared, "prepared disk")
    parsed = parse(PrepareRequest, request)
    with device_context(self, parsed, operation) as ctx:
        return mapping.map_partitions(disk, parsed.partition, ctx).model_dump(mode="json")
