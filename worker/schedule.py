"""What Celery beat sends periodically (`imgprep beat`): the image cache manager."""

from __future__ import annotations

from typing import Any

from worker.routing import DEFAULT_QUEUE
from worker.settings import Settings

EVICT_CACHE = "imgprep.evict_cache"


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    interval = settings.image_cache.manager_interval_seconds
    return {
        "age-image-cache": {
            "task": EVICT_CACHE,
            "schedule": interval,
            "args": ({},),
            # A pass nobody ran before the next one is due is dropped, not piled up.
            "options": {"queue": DEFAULT_QUEUE, "expires": interval},
        }
    }
