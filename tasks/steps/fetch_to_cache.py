"""imgprep.fetch_to_cache: the image into the shared cache, downloaded once, and pinned for the
canvas until its disk references it (domain.cache.references)."""

from __future__ import annotations

from typing import Any

import structlog

from domain.cache.fetch import cache_key, fetch_to_cache, find_cached
from domain.cache.references import claim, fetch_pinned, pending_holder
from domain.core.models import CachedImage, ImageSource, PrepareRequest
from domain.core.ports import no_progress
from worker.app import app
from worker.metrics import FetchMeter
from worker.progress import TaskProgress
from worker.runtime import runtime
from worker.taskbase import StepTask, parse


@app.task(name="imgprep.fetch_to_cache", base=StepTask, bind=True)
def fetch(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    source = parse(PrepareRequest, request).image
    structlog.contextvars.bind_contextvars(image_key=cache_key(source.image_id))
    current = runtime()
    meter = FetchMeter(TaskProgress(self, "fetch_to_cache"))
    cached = fetch_pinned(
        lambda: fetch_to_cache(
            source,
            cache=current.cache,
            options=current.fetch_options,
            runner=current.runner,
            locks=current.locks,
            progress=meter,
        ),
        pending_holder(self.request.root_id or self.request.id),
        locks=current.locks,
        references=current.references,
    )
    meter.count_request()
    return cached.model_dump(mode="json")


def pinned_if_cached(source: ImageSource, root_id: str) -> CachedImage | None:
    """The image's cache entry, pinned for the canvas of `root_id`, when it is already cached.

    The entry task asks this before it builds its canvas: a cache hit needs no fetch step (its
    postcondition holds), which spares every cache-hit prepare a whole task. None when the
    image must be fetched, or its entry went between the look and the pin.
    """
    current = runtime()
    cached = find_cached(source, current.cache)
    if cached is None:
        return None
    if not claim(
        cached, pending_holder(root_id), locks=current.locks, references=current.references
    ):
        return None
    FetchMeter(no_progress).count_request()  # a hit
    return cached


def unpin(cached: CachedImage, root_id: str) -> None:
    """Drop the pin `pinned_if_cached` took, when the entry task fails before its canvas runs."""
    runtime().references.discard(cached.key, pending_holder(root_id))
