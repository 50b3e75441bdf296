"""imgprep.release_devices: the errback of every device step (domain.guest.teardown).

It releases what the operation holds for the request's disk, for failures that never reach the
step's own release (a hard time limit kills the process before it can clean up).
"""

from __future__ import annotations

from typing import Any

from domain.core.models import PrepareRequest
from domain.guest import teardown
from worker.app import app
from worker.app.device_steps import device_context, disk_of
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.release_devices", base=StepTask, bind=True, journaled=False)
def release_devices(self: StepTask, request: dict[str, Any], operation: str) -> bool:
    """Release what `operation` holds for the request's disk; whether it held any."""
    parsed = parse(PrepareRequest, request)
    with device_context(self, parsed, operation) as ctx:
        return teardown.release_devices(disk_of(parsed), ctx)
