"""imgprep.snapshot_source: on the disk's host, the conversion a snapshot needs."""

from __future__ import annotations

from typing import Any

import structlog

from domain.core.snapshot_models import SnapshotRequest
from domain.formats.snapshot import plan_snapshot
from worker.app import app
from worker.runtime import runtime
from worker.taskbase import StepTask, parse


@app.task(name="imgprep.snapshot_source", base=StepTask, bind=True)
def snapshot_source(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    parsed = parse(SnapshotRequest, request)
    structlog.contextvars.bind_contextvars(instance_id=parsed.instance_id)
    settings = runtime().settings
    job = plan_snapshot(
        parsed, instances_dir=settings.instances_dir, snapshots_dir=settings.snapshots_dir
    )
    return job.model_dump(mode="json")
