"""imgprep.remove_disk: an instance disk removed on its host, its base references dropped."""

from __future__ import annotations

from typing import Any

from domain.core.models import DeleteDiskRequest
from domain.disks.removal import delete_disk
from worker.app import app
from worker.redis_ledger import RedisDeviceLedger
from worker.runtime import runtime
from worker.taskbase import StepTask, parse


@app.task(name="imgprep.remove_disk", base=StepTask, bind=True)
def remove_disk(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    parsed = parse(DeleteDiskRequest, request)
    current = runtime()
    deleted = delete_disk(
        parsed.instance_id,
        parsed.disk_name,
        instances_dir=current.settings.instances_dir,
        host=current.settings.host_id,
        locks=current.locks,
        references=current.references,
        devices=RedisDeviceLedger(current.redis, current.settings.host_id),
    )
    return deleted.model_dump(mode="json")
