"""imgprep.prepare_disk: fetch the image into the cache and create the instance disk.

`imgprep.prepare_disk(request)` validates the request, builds its canvas and replaces itself
with it; the canvas's last step carries the caller's task id, so waiting on that id yields the
final result, or the failure with its error class and message.
"""

from __future__ import annotations

from typing import Any

from tasks.canvases import prepare_disk_steps, with_ids
from tasks.models import PrepareRequest
from worker.app import app
from worker.entry import EntryTask, plan
from worker.settings import get_settings
from worker.taskbase import parse


@app.task(name="imgprep.prepare_disk", base=EntryTask, bind=True)
def prepare_disk(self: EntryTask, request: dict[str, Any]) -> Any:
    """Fetch the image into the cache, create the instance disk and inject the request's files
    into it; result: PreparedDisk."""
    parsed = parse(PrepareRequest, request)
    steps = prepare_disk_steps(
        parsed, host=parsed.host or get_settings().host_id, operation=self.request.id
    )
    canvas = with_ids(steps, self.request.id)
    plan(self, canvas)
    return self.replace(canvas)
