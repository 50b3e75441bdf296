"""imgprep.snapshot_rbd: an rbd disk's snapshot, direct (a new image in the cluster's images
pool) or extracted to a file under the snapshots directory (domain.rbd.snapshots)."""

from __future__ import annotations

from typing import Any

from domain.formats.snapshot_models import SnapshotRequest
from domain.rbd import snapshots
from worker.app import app
from worker.app.progress import TaskProgress
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.snapshot_rbd", base=StepTask, bind=True)
def snapshot_rbd(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    current = runtime()
    made = snapshots.snapshot_rbd(
        parse(SnapshotRequest, request),
        current.rbd,
        snapshots_dir=current.settings.snapshots_dir,
        locks=current.locks,
        limits=current.qemu_limits,
        progress=TaskProgress(self, "snapshot_rbd"),
    )
    return made.model_dump(mode="json")
