"""imgprep.precache_host: the images of a precache into this host's cache (domain.cache.precache),
each fetched as a prepare would (in host scope from peers when it can), at most
`precache_concurrency` of them from their origin at once across the fleet. Progress per host as
the custom state PROGRESS."""

from __future__ import annotations

import functools
from typing import Any

from domain.cache import fetch, fleet, precache
from domain.core.models import CachedImage, ImageSource
from domain.core.ports import Progress
from domain.core.precache_models import PrecacheHostRequest
from worker.app import app
from worker.progress import TaskProgress
from worker.runtime import runtime
from worker.taskbase import StepTask, parse


@app.task(name="imgprep.precache_host", base=StepTask, bind=True)
def precache_host(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    parsed = parse(PrecacheHostRequest, request)
    current = runtime()
    gate = functools.partial(
        precache.origin_slot,
        current.fleet_locks_now,
        current.settings.precache_concurrency,
        wait_seconds=current.settings.lock.wait_seconds,
    )
    member = current.fleet_with(gate)

    def fetch_one(source: ImageSource, progress: Progress) -> CachedImage:
        if member is not None:
            return fleet.fetch_image(
                source,
                cache=current.cache,
                options=current.fetch_options,
                runner=current.runner,
                locks=current.locks,
                fleet=member,
                progress=progress,
            )
        with gate():
            return fetch.fetch_image(
                source,
                cache=current.cache,
                options=current.fetch_options,
                runner=current.runner,
                locks=current.locks,
                progress=progress,
            )

    count = len(parsed.images)
    report = precache.precache_host(
        parsed,
        cache=current.cache,
        fetch=fetch_one,
        progress=lambda index, source: TaskProgress(
            self, f"precache {parsed.host} {index + 1}/{count} {source.image_id}"
        ),
        will_retry=self.will_retry,
    )
    return report.model_dump(mode="json")
