"""imgprep.snapshot: extract an instance disk to a standalone image (Nova's cold snapshot).

`imgprep.snapshot(request)` validates a SnapshotRequest, builds its canvas (on the disk's
host: read the disk's recorded format and plan the conversion, then convert) and hands its
task id over to it; waiting on the caller's id yields the ConvertedImage, or the failure.
"""

from __future__ import annotations

from typing import Any

from domain.formats.snapshot_models import SnapshotRequest
from tasks.canvases import snapshot_steps, with_ids
from worker.app import app
from worker.app.entry import CanvasEntryTask, hand_over, plan, target_host
from worker.app.taskbase import parse


@app.task(name="imgprep.snapshot", base=CanvasEntryTask, bind=True)
def snapshot(self: CanvasEntryTask, request: dict[str, Any]) -> None:
    """Extract an instance disk to an image under the snapshots directory; result:
    ConvertedImage."""
    parsed = parse(SnapshotRequest, request)
    canvas = with_ids(snapshot_steps(parsed, host=target_host(parsed.host)), self.request.id)
    plan(self, canvas)
    hand_over(self, canvas)
