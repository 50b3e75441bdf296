"""imgprep.teardown: unmount and release the disk's devices; the canvas's final result
(domain.guest.teardown)."""

from __future__ import annotations

from typing import Any

from domain.core.models import PrepareRequest
from domain.guest import teardown as guest_teardown
from domain.guest.context import InjectedDisk
from worker.app import app
from worker.app.device_steps import device_context, disk_of
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.teardown", base=StepTask, bind=True)
def teardown(
    self: StepTask, injected: dict[str, Any], request: dict[str, Any], operation: str
) -> dict[str, Any]:
    done = parse(InjectedDisk, injected, "injected disk")
    parsed = parse(PrepareRequest, request)
    with device_context(self, parsed, operation) as ctx:
        prepared = guest_teardown.teardown(done, disk_of(parsed), ctx)
    return prepared.model_dump(mode="json")
