"""imgprep.copy_raw_disk: the instance disk as a sparse raw copy of the cached base
(tasks.disk_steps, domain.disks.instance_disks)."""

from __future__ import annotations

from typing import Any

from tasks import disk_steps
from worker.app import app
from worker.app.taskbase import StepTask


@app.task(name="imgprep.copy_raw_disk", base=StepTask, bind=True)
def copy_raw_disk(
    self: StepTask, fetched: dict[str, Any], request: dict[str, Any]
) -> dict[str, Any]:
    return disk_steps.create_file_disk(self, "raw", fetched, request)
