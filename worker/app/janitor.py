"""The janitor: when a worker starts, release the devices that dead workers left on this host.

A worker killed while a disk was mounted leaves a fuse2fs or kernel mount, maybe a loop device
and a qemu-storage-daemon, all named in the resource ledger. When a worker is ready (before it
takes its first task), it reads its host's records and releases every one whose last worker is
gone: itself under the same name (it just started, so that was an earlier life), or a node that
does not answer a ping. Records of live workers are left alone; a disk whose lock another
worker holds is skipped. Nothing the janitor does stops the worker from starting.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import structlog
from celery import Celery

from domain.core.errors import ImgprepError, LockBusy
from domain.disks.device_records import DeviceRecord
from domain.guest.teardown import release_devices
from worker.app.device_steps import build_context
from worker.app.runtime import Runtime, build_runtime, lock_factory
from worker.settings import get_settings

log = structlog.get_logger(__name__)

PING_TIMEOUT = 1.0
LOCK_WAIT = 10.0


def live_workers(app: Celery, nodenames: set[str]) -> set[str]:
    """The nodes among `nodenames` that answer a ping."""
    if not nodenames:
        return set()
    replies = app.control.ping(destination=sorted(nodenames), timeout=PING_TIMEOUT)
    return {name for reply in replies for name in reply}


def orphans(records: list[DeviceRecord], alive: set[str]) -> list[DeviceRecord]:
    return [record for record in records if record.worker not in alive]


def release_orphans(app: Celery, nodename: str, current: Runtime) -> list[str]:
    """Release the records of this host whose worker is gone; the disks released."""
    ledger = current.devices
    records = ledger.records()
    if not records:
        return []
    alive = live_workers(app, {r.worker for r in records if r.worker != nodename})
    released = []
    # the steps' own lock names (in host scope, the host's namespace) and replica confirmation
    locks = lock_factory(current.redis, current.settings, wait=LOCK_WAIT)
    for record in orphans(records, alive):
        ctx = replace(build_context(current, owner=record.owner, worker=nodename), locks=locks)
        try:
            if release_devices(record.disk, ctx, any_owner=True):
                released.append(record.disk)
                log.warning(
                    "orphaned_devices_released",
                    disk=record.disk,
                    owner=record.owner,
                    dead_worker=record.worker,
                    resources=[r.kind for r in record.resources],
                )
        except LockBusy:
            log.info("orphan_skipped", disk=record.disk, reason="its lock is held")
        except ImgprepError as error:
            log.error("orphan_release_failed", disk=record.disk, error=str(error))
    return released


def release_orphans_at_start(sender: Any, **_: Any) -> None:
    current = build_runtime(get_settings())
    try:
        release_orphans(sender.app, str(sender.hostname), current)
    except Exception as error:  # the janitor must never keep a worker from starting
        log.error("janitor_failed", error_class=type(error).__name__, error=str(error))
    finally:
        current.redis.close()
