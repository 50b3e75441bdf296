"""imgprep.evict_cache: one pass of the image cache manager (domain.cache.eviction).

Celery beat sends it every `image_cache.manager_interval_seconds` (`imgprep beat`);
`imgprep cache evict` sends it on demand. It runs on the worker that receives it: the cache is
shared, and that worker's own disks are checked with qemu-img besides the references in Redis.
In host scope every host has its own cache: a pass taken from the shared queue also sends one
to the queue of every other live host (its result is the receiving host's report). With
`backend` "rbd" it ages the images imported into the receiving worker's Ceph cluster instead
(domain.rbd.aging).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from domain.cache import eviction
from domain.core.models import CacheEvictionReport, EvictCacheRequest
from domain.rbd import aging
from worker.app import app
from worker.app.entry import EntryTask
from worker.app.routing import DEFAULT_QUEUE, host_queue
from worker.app.runtime import runtime
from worker.app.taskbase import parse
from worker.delivery.hosts import live_hosts
from worker.metrics import count_evictions


@app.task(name="imgprep.evict_cache", base=EntryTask, bind=True, request_required=False)
def evict_cache(self: EntryTask, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Remove cached bases no instance disk uses; result: CacheEvictionReport."""
    current = runtime()
    parsed = parse(EvictCacheRequest, request or {})
    if parsed.backend == "rbd":  # this worker's cluster's imported images
        return _age_rbd_images(parsed).model_dump(mode="json")
    routed = (self.request.delivery_info or {}).get("routing_key")
    if current.settings.image_cache.scope == "host" and routed == DEFAULT_QUEUE:
        # each host's cache is its own: a pass from the shared queue (beat) runs on every host
        for host in live_hosts(current.settings, current.redis):
            if host != current.settings.host_id:
                app.send_task("imgprep.evict_cache", args=[request or {}], queue=host_queue(host))
    report = eviction.evict_cache(parsed, current.cache_manager, current.aging_policy)
    count_evictions(report)
    return report.model_dump(mode="json")


def _age_rbd_images(request: EvictCacheRequest) -> CacheEvictionReport:
    current = runtime()
    window = request.remove_unused_original_minimum_age_seconds
    report = aging.age_rbd_images(
        dataclasses.replace(current.rbd, cluster_locks=current.fleet_locks_now),
        minimum_age_seconds=(
            window
            if window is not None
            else current.settings.image_cache.remove_unused_original_minimum_age_seconds
        ),
        host=current.settings.host_id,
        dry_run=request.dry_run,
    )
    count_evictions(report)
    return report
