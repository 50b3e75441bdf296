"""imgprep.precache_report: the last step of a precache, after every host's step (a chord's
body): one report of every host's, with the hosts that could not be asked (failed up front)."""

from __future__ import annotations

from typing import Any

from domain.cache import precache
from domain.cache.precache_models import PrecacheReport
from worker.app import app
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.precache_report", base=StepTask, bind=True)
def precache_report(
    self: StepTask, reports: list[dict[str, Any]], refused: dict[str, Any]
) -> dict[str, Any]:
    parsed = [parse(PrecacheReport, report, "host report") for report in [*reports, refused]]
    return precache.precache_report(parsed).model_dump(mode="json")
