"""imgprep.clone_rbd_disk: the instance disk as a clone of its image's protected snapshot in the
Ceph cluster (domain.rbd.clones)."""

from __future__ import annotations

from typing import Any

from domain.core.models import CachedImage, PrepareRequest
from domain.rbd import clones
from worker.app import app
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.clone_rbd_disk", base=StepTask, bind=True)
def clone_rbd_disk(
    self: StepTask, imported: dict[str, Any], request: dict[str, Any]
) -> dict[str, Any]:
    current = runtime()
    prepared = clones.clone_rbd_disk(
        parse(PrepareRequest, request),
        parse(CachedImage, imported, "imported image"),
        current.rbd,
        current.settings.host_id,
    )
    return prepared.model_dump(mode="json")
