"""imgprep.prepare_disk: fetch the image into the cache and create the instance disk.

`imgprep.prepare_disk(request)` validates the request, builds its canvas and hands its task id
over to it (worker.app.entry.hand_over): the canvas's last step carries the caller's task id, so
waiting on that id yields the final result, or the failure with its error class and message.
When the image is already cached, the entry task pins it itself (domain.cache.references.
pin_if_cached) and the canvas starts with the disk step.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import Ignore

from domain.cache import references
from domain.core.models import PrepareRequest
from tasks.canvases import prepare_disk_steps, with_ids
from worker.app import app
from worker.app.entry import CanvasEntryTask, hand_over, plan, target_host
from worker.app.runtime import runtime
from worker.app.taskbase import canvas_pin, parse
from worker.metrics import count_cache_hit


@app.task(name="imgprep.prepare_disk", base=CanvasEntryTask, bind=True)
def prepare_disk(self: CanvasEntryTask, request: dict[str, Any]) -> None:
    """Fetch the image into the cache, create the instance disk and inject the request's files
    into it; result: PreparedDisk."""
    parsed = parse(PrepareRequest, request)
    host = target_host(parsed.host)  # before the pin: a refused host must pin nothing
    current, pin = runtime(), canvas_pin(self)
    scope = current.settings.image_cache.scope
    cached = None
    # in host scope only the host's own cache counts: another host's entry task cannot look
    # an rbd disk's image is in the cluster, not the cache: its import step looks
    if parsed.disk.backend == "rbd":
        pass
    elif scope == "shared" or host == current.settings.host_id:
        cached = references.pin_if_cached(
            parsed.image,
            pin,
            cache=current.cache,
            locks=current.locks,
            references=current.references,
        )
    if cached is not None:
        count_cache_hit()
    try:
        steps = prepare_disk_steps(
            parsed, host=host, operation=self.request.id, cached=cached, scope=scope
        )
        canvas = with_ids(steps, self.request.id)
        plan(self, canvas, done=["imgprep.fetch_to_cache"] if cached else [])
        hand_over(self, canvas)
    except Ignore:  # Task.replace sent the canvas, which now owns the pin
        raise
    except BaseException:
        if cached is not None:  # no canvas will drop the pin: drop it now
            references.unpin(cached, pin, current.references)
        raise
