"""imgprep.import_to_rbd: the request's image into the Ceph cluster's images pool, imported once
per cluster, with a protected snapshot (domain.rbd.images)."""

from __future__ import annotations

from typing import Any

from domain.core.models import PrepareRequest
from domain.rbd import images
from worker.app import app
from worker.app.progress import TaskProgress
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, parse
from worker.metrics import FetchMeter, count_rbd_import


@app.task(name="imgprep.import_to_rbd", base=StepTask, bind=True)
def import_to_rbd(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    source = parse(PrepareRequest, request).image
    progress = TaskProgress(self, "import_to_rbd")
    reported: list[int] = []

    def imported(done: int, total: int | None) -> None:
        reported.append(done)
        progress(done, total)

    result = images.import_to_rbd(source, runtime().rbd, imported, downloaded=FetchMeter(progress))
    count_rbd_import(imported=bool(reported))
    return result.model_dump(mode="json")
