"""What Celery beat sends periodically (`imgprep beat`): the image cache manager, and with
rbd.age_images the aging of the images imported into the host's Ceph cluster."""

from __future__ import annotations

from typing import Any

from worker.app.routing import DEFAULT_QUEUE, host_queue
from worker.settings import Settings

EVICT_CACHE = "imgprep.evict_cache"


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    interval = settings.image_cache.manager_interval_seconds
    schedule = {
        "age-image-cache": {
            "task": EVICT_CACHE,
            "schedule": interval,
            "args": ({},),
            # A pass nobody ran before the next one is due is dropped, not piled up.
            "options": {"queue": DEFAULT_QUEUE, "expires": interval},
        }
    }
    if settings.rbd.age_images:
        # the images imported into beat's host's cluster: a pass on a worker of that host
        schedule["age-rbd-images"] = {
            "task": EVICT_CACHE,
            "schedule": interval,
            "args": ({"backend": "rbd"},),
            "options": {"queue": host_queue(settings.host_id), "expires": interval},
        }
    return schedule
