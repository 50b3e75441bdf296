"""imgprep.evict_cache: one pass of the image cache manager (domain.cache.eviction).

Celery beat sends it every `image_cache.manager_interval_seconds` (`imgprep beat`);
`imgprep cache evict` sends it on demand. It runs on the worker that receives it: the cache is
shared, and that worker's own disks are checked with qemu-img besides the references in Redis.
"""

from __future__ import annotations

from typing import Any

from domain.cache.eviction import AgingPolicy, CacheManager
from domain.core.models import EvictCacheRequest
from worker.app import app
from worker.entry import EntryTask
from worker.metrics import evicted
from worker.runtime import runtime
from worker.taskbase import parse


@app.task(name="imgprep.evict_cache", base=EntryTask, bind=True, request_required=False)
def evict_cache(self: EntryTask, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Remove cached bases no instance disk uses; result: CacheEvictionReport."""
    parsed = parse(EvictCacheRequest, request or {})
    current = runtime()
    configured = current.settings.image_cache
    policy = AgingPolicy(
        minimum_age_seconds=_first(
            parsed.remove_unused_original_minimum_age_seconds,
            configured.remove_unused_original_minimum_age_seconds,
        ),
        max_bytes=_first(parsed.max_bytes, configured.max_bytes),
        min_idle_seconds=configured.min_idle_seconds,
        stale_reference_seconds=float(current.settings.result_expires),
    )
    manager = CacheManager(
        cache=current.cache,
        references=current.references,
        locks=current.locks_now,
        instances_dir=current.settings.instances_dir,
        host=current.settings.host_id,
        runner=current.runner,
        limits=current.qemu_limits,
    )
    report = manager.run(policy, dry_run=parsed.dry_run)
    if not report.dry_run:
        for item in report.evicted:
            evicted(item.reason, item.size_on_disk)
    return report.model_dump(mode="json")


def _first(override: Any, configured: Any) -> Any:
    return configured if override is None else override
