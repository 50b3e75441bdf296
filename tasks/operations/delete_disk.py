"""imgprep.delete_disk: remove an instance disk on its host and drop its reference to its base.

Validates the request and hands its task id over to the one-step canvas on the host's queue; the
step carries the caller's task id, so waiting on it yields the DeletedDisk.
"""

from __future__ import annotations

from typing import Any

from domain.core.models import DeleteDiskRequest
from tasks.canvases import delete_disk_steps, with_ids
from worker.app import app
from worker.app.entry import CanvasEntryTask, hand_over, plan, target_host
from worker.app.taskbase import parse


@app.task(name="imgprep.delete_disk", base=CanvasEntryTask, bind=True)
def delete_disk(self: CanvasEntryTask, request: dict[str, Any]) -> None:
    """Remove the instance disk and its reference; result: DeletedDisk."""
    parsed = parse(DeleteDiskRequest, request)
    canvas = with_ids(delete_disk_steps(parsed, host=target_host(parsed.host)), self.request.id)
    plan(self, canvas)
    hand_over(self, canvas)
