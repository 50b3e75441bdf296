"""What the device steps (map, mount, inject, teardown) share on the worker side.

`device_context()` builds the DeviceContext for one step — this host's ledger in Redis, the
runner, the lock factory, the mount settings, the operation that owns the disk and this worker's
name — and guarantees teardown: when the step fails for good (not when it is about to be
retried), the disk's devices are released before the failure is stored, so the caller who sees
the failure finds nothing left mounted. The canvas also links `imgprep.release_devices` as the
errback of these steps, for failures that never reach this code (a hard time limit).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from domain.core.models import PrepareRequest
from domain.guest.context import DeviceContext
from domain.guest.teardown import release_devices
from worker.app.runtime import Runtime, runtime
from worker.app.taskbase import StepTask

log = structlog.get_logger(__name__)


def build_context(current: Runtime, *, owner: str, worker: str) -> DeviceContext:
    settings = current.settings
    return DeviceContext(
        runner=current.runner,
        ledger=current.devices,
        locks=current.locks,
        policy=settings.mount,
        state_dir=settings.state_dir,
        devices_dir=settings.devices_dir,
        instances_dir=settings.instances_dir,
        cache_dir=settings.cache_dir,
        host=settings.host_id,
        owner=owner,
        worker=worker,
        privileged=current.privileged,
        ceph=current.ceph_access,
    )


def disk_of(request: PrepareRequest) -> str:
    return f"{request.disk.instance_id}/{request.disk.disk_name}"


@contextmanager
def device_context(
    task: StepTask, request: PrepareRequest, operation: str, current: Runtime | None = None
) -> Iterator[DeviceContext]:
    """The step's DeviceContext; on a final failure, the disk's devices are released."""
    ctx = build_context(
        current or runtime(), owner=operation, worker=str(task.request.hostname or "")
    )
    structlog.contextvars.bind_contextvars(disk=disk_of(request), operation=operation)
    try:
        yield ctx
    except Exception as error:
        if not task.will_retry(error):
            release_quietly(ctx, disk_of(request))
        raise


def release_quietly(ctx: DeviceContext, disk: str) -> None:
    """Tear down after a failure; a teardown that fails too is logged, the first error stands."""
    try:
        release_devices(disk, ctx)
    except Exception as error:
        log.error(
            "teardown_after_failure_failed",
            disk=disk,
            error_class=type(error).__name__,
            error=str(error),
        )
