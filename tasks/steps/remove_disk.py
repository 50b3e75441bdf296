"""imgprep.remove_disk: an instance disk removed on its host, its base references dropped
(domain.disks.removal)."""

from __future__ import annotations

from typing import Any

from domain.core.models import DeleteDiskRequest
from domain.disks import removal
from worker.app import app
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.remove_disk", base=StepTask, bind=True)
def remove_disk(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    current = runtime()
    deleted = removal.remove_disk(
        parse(DeleteDiskRequest, request), current.disk_context, current.devices
    )
    return deleted.model_dump(mode="json")
