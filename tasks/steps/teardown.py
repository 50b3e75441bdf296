"""imgprep.teardown: unmount and release the disk's devices; the canvas's final result.

imgprep.release_devices is the same release as an errback, linked to every device step, for
failures that never reach the step's own teardown (a hard time limit kills the process).
"""

from __future__ import annotations

from typing import Any

from domain.core.models import GuestFilesystem, PreparedDisk, PrepareRequest
from domain.guest.context import InjectedDisk
from domain.guest.teardown import teardown
from worker.app import app
from worker.device_context import device_context, disk_of
from worker.taskbase import StepTask, parse


@app.task(name="imgprep.teardown", base=StepTask, bind=True)
def teardown_step(
    self: StepTask, injected: dict[str, Any], request: dict[str, Any], operation: str
) -> dict[str, Any]:
    done = parse(InjectedDisk, injected, "injected disk")
    parsed = parse(PrepareRequest, request)
    with device_context(self, parsed, operation) as ctx:
        teardown(disk_of(parsed), ctx)
    mapped = done.mounted.mapped
    guest = GuestFilesystem(
        partition=mapped.partition.number, filesystem=mapped.filesystem, mount=mapped.method
    )
    prepared = mapped.prepared.model_copy(update={"guest": guest, "injected": done.files})
    return PreparedDisk.model_validate(prepared.model_dump()).model_dump(mode="json")


@app.task(name="imgprep.release_devices", base=StepTask, bind=True, journaled=False)
def release_devices(self: StepTask, request: dict[str, Any], operation: str) -> bool:
    """Errback: release what `operation` holds for the request's disk; whether it held any."""
    parsed = parse(PrepareRequest, request)
    with device_context(self, parsed, operation) as ctx:
        return teardown(disk_of(parsed), ctx)
