"""Deleting an instance disk (Nova's `_cleanup` of instance files), and its reference to its base.

Under the instance's lease `disk:<instance>` (the one its disks' creation takes), the disk and any
temporary of it are removed and the directory synced, and its format record goes from
disk.info; the instance directory goes when empty.
Then every reference the disk held is dropped, so the cache manager may age its base out.
Deleting a disk that is not there succeeds: a re-delivered request finds nothing to do.
"""

from __future__ import annotations

import contextlib
import os

import structlog

from domain.cache.references import disk_holder
from domain.core import diskinfo
from domain.core.errors import DiskBusy
from domain.core.fileops import fsync_directory, remove_files
from domain.core.models import DeletedDisk, DeleteDiskRequest, DiskSpec
from domain.core.paths import child, instance_dir
from domain.core.publish import stale_temporaries
from domain.disks.instance_disks import DiskContext, disk_lock_name
from domain.disks.ports import DeviceLedger

log = structlog.get_logger(__name__)


def remove_disk(request: DeleteDiskRequest, ctx: DiskContext, devices: DeviceLedger) -> DeletedDisk:
    """Make sure the disk is gone and unreferenced; report whether it was there.

    A disk whose devices an operation holds (mapped, mounted: see domain.disks.device_records) is
    not deleted under it: DiskBusy, retried until that operation's teardown has released them.
    """
    instance_id, disk_name = request.instance_id, request.disk_name
    directory = instance_dir(ctx.instances_dir, instance_id)
    path = child(directory, disk_name)
    held = devices.get(f"{instance_id}/{disk_name}")
    if held is not None:
        raise DiskBusy(
            f"{path} is in use by operation {held.owner} (devices or mounts held); "
            "it is deleted once that operation has torn down"
        )
    # the same lock name as the disk's creation; the size plays no part in it
    spec = DiskSpec.model_construct(instance_id=instance_id, disk_name=disk_name, size_bytes=0)
    with ctx.locks(disk_lock_name(spec)) as lease:
        existed = path.exists()
        removed = remove_files([path, *stale_temporaries(path)])
        if removed:
            fsync_directory(directory)
        diskinfo.forget_format(directory, disk_name, lease)
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # only when empty: other disks of the instance stay
    released = ctx.references.forget(disk_holder(ctx.host, instance_id, disk_name))
    log.info("disk_deleted", path=str(path), existed=existed, released_bases=released)
    return DeletedDisk(
        host=ctx.host,
        instance_id=instance_id,
        disk_name=disk_name,
        path=str(path),
        existed=existed,
        released_bases=released,
    )
