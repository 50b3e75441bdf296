"""imgprep.precache_host: the images of a precache into this host's cache (domain.cache.precache),
each fetched as a prepare would (in host scope from peers when it can), at most
`precache_concurrency` of them from their origin at once across the fleet. Progress per host as
the custom state PROGRESS. As a part of a precache (a chord), a step that fails — its host dead
before it ended (swept by worker.delivery.hosts: HostUnavailable), its pool process lost too often,
its time limit — ends with its host's report, every image failed with that error, so the precache's
body still runs and reports every host."""

from __future__ import annotations

import functools
from typing import Any

from domain.cache import fetch, fleet, precache
from domain.cache.precache_models import PrecacheHostRequest
from domain.core.models import CachedImage, ImageSource
from domain.core.ports import Progress
from worker.app import app
from worker.app.entry import the_request
from worker.app.progress import TaskProgress
from worker.app.runtime import runtime
from worker.app.taskbase import FailureAsResult, StepTask, parse


class PrecacheHostTask(StepTask):
    """A precache host step: whatever becomes of it as a part of its precache, it ends with its
    host's report, so the precache's report has an entry per host and image."""

    abstract = True

    @property
    def backend(self) -> Any:
        return FailureAsResult(self.app.backend, self)

    def failed_result(
        self, args: list[Any], kwargs: dict[str, Any], error: BaseException
    ) -> dict[str, Any] | None:
        """Every image of the host failed with `error` (HostUnavailable naming the host when it
        died with the step queued or running, WorkerLostError, StepTimedOut, ...)."""
        parsed = parse(PrecacheHostRequest, the_request(self.name, args, kwargs, required=True))
        return precache.host_failed(parsed.host, parsed.images, error).model_dump(mode="json")


@app.task(name="imgprep.precache_host", base=PrecacheHostTask, bind=True)
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
