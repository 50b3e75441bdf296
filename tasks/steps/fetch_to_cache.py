"""imgprep.fetch_to_cache: the image into the shared cache, downloaded once, and pinned for the
canvas until its disk references it (domain.cache.fetch); in host scope into this host's cache,
from peers or the origin (domain.cache.fleet)."""

from __future__ import annotations

from typing import Any

from domain.cache import fetch
from domain.core.models import PrepareRequest
from worker.app import app
from worker.app.progress import TaskProgress
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, canvas_pin, parse
from worker.metrics import FetchMeter


@app.task(name="imgprep.fetch_to_cache", base=StepTask, bind=True)
def fetch_to_cache(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    source = parse(PrepareRequest, request).image
    current = runtime()
    meter = FetchMeter(TaskProgress(self, "fetch_to_cache"))
    cached = fetch.fetch_to_cache(
        source,
        canvas_pin(self),
        cache=current.cache,
        options=current.fetch_options,
        runner=current.runner,
        locks=current.locks,
        references=current.references,
        progress=meter,
        fleet=current.fleet,  # host scope: this host's cache, from peers or the origin
    )
    meter.count_request()
    return cached.model_dump(mode="json")
