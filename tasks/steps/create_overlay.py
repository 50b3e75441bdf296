"""imgprep.create_overlay: the instance disk as a qcow2 overlay on the cached base
(tasks.disk_steps, domain.disks.instance_disks)."""

from __future__ import annotations

from typing import Any

from tasks import disk_steps
from worker.app import app
from worker.app.taskbase import StepTask


@app.task(name="imgprep.create_overlay", base=StepTask, bind=True)
def create_overlay(
    self: StepTask, fetched: dict[str, Any], request: dict[str, Any]
) -> dict[str, Any]:
    return disk_steps.create_file_disk(self, "qcow2", fetched, request)
