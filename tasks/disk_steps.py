"""The disk step of the file backends, one body for its two tasks: imgprep.create_overlay (a
qcow2 overlay on the cached base) and imgprep.copy_raw_disk (a sparse raw copy of it).

Each task passes its own backend, so the task name, never the message, says what kind of disk
is made (domain.disks.instance_disks.create_instance_disk).
"""

from __future__ import annotations

from typing import Any

from domain.core.models import CachedImage, PrepareRequest
from domain.disks import instance_disks
from domain.disks.backends import FileBackend
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, canvas_pin, parse


def create_file_disk(
    task: StepTask, backend: FileBackend, fetched: dict[str, Any], request: dict[str, Any]
) -> dict[str, Any]:
    """The disk of `request` made by `backend` on the cached base `fetched` names."""
    prepared = instance_disks.create_instance_disk(
        backend,
        parse(PrepareRequest, request),
        parse(CachedImage, fetched, "cached image"),
        runtime().disk_context,
        pin=canvas_pin(task),
        final_attempt=task.final_attempt,
    )
    return prepared.model_dump(mode="json")
