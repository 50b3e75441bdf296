"""imgprep.remove_rbd_disk: an instance disk's clone removed from the Ceph cluster with its
snapshots (domain.rbd.clones.delete_disk, Nova's `_cleanup_rbd`)."""

from __future__ import annotations

from typing import Any

from domain.core.models import DeleteDiskRequest
from domain.rbd import clones
from worker.app import app
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.remove_rbd_disk", base=StepTask, bind=True)
def remove_rbd_disk(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    current = runtime()
    deleted = clones.remove_rbd_disk(
        parse(DeleteDiskRequest, request), current.rbd, current.settings.host_id
    )
    return deleted.model_dump(mode="json")
