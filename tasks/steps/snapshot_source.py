"""imgprep.snapshot_source: on the disk's host, the conversion a snapshot needs
(domain.formats.snapshot)."""

from __future__ import annotations

from typing import Any

from domain.formats import snapshot
from domain.formats.snapshot_models import SnapshotRequest
from worker.app import app
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.snapshot_source", base=StepTask, bind=True)
def snapshot_source(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    settings = runtime().settings
    job = snapshot.snapshot_source(
        parse(SnapshotRequest, request),
        instances_dir=settings.instances_dir,
        snapshots_dir=settings.snapshots_dir,
    )
    return job.model_dump(mode="json")
