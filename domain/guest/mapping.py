"""map_partitions: claim the instance disk, expose it as raw bytes, find the guest filesystem.

Nova's get_dev + map_dev, as one idempotent step: the disk is claimed for the operation in the
resource ledger, a disk view is attached (the raw file, or a qemu-storage-daemon export of a
qcow2 overlay), the partition table is read and validated, the request's partition is chosen,
its filesystem detected and checked against the allow-list, and — only for a kernel mount — the
partition becomes its own loop device. Running it again for the same operation reuses what is
there. Host capabilities are probed once per process.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from domain.core.errors import PartitionTableInvalid
from domain.core.models import PreparedDisk
from domain.disks.device_records import WorkDir
from domain.formats.partitions import PartitionChoice, choose, read_table
from domain.guest.context import (
    Claim,
    DeviceContext,
    GuestPartition,
    MappedDisk,
    check_disk,
    disk_key,
)
from domain.guest.devices import (
    HostCapabilities,
    choose_partition_device,
    choose_view,
    host_capabilities,
)
from domain.guest.mounting import detect_filesystem, mount_method

log = structlog.get_logger(__name__)


def map_partitions(
    prepared: PreparedDisk,
    choice: PartitionChoice,
    ctx: DeviceContext,
    host: HostCapabilities | None = None,
) -> MappedDisk:
    """Claim the disk and find the guest filesystem to mount."""
    host = host or host_capabilities()
    disk = prepared.disk
    check_disk(disk, ctx)
    key = disk_key(disk)
    with ctx.locks(ctx.lock_name(key)):
        claim = Claim.take(ctx, key)
        area = ctx.work_area(key)
        claim.note(WorkDir(path=str(area.path)))
        ctx.ops.make_work_area(area.path)  # root's tree with the helper: it makes it
        view = choose_view(disk.format, host, disk.backend).attach(disk, area, claim, ctx)
        partition = _partition(view, choice, key)
        where = (
            f"the whole disk {key}"
            if partition.number is None
            else f"partition {partition.number} of {key}"
        )
        fstype = detect_filesystem(
            ctx.runner,
            view,
            offset=partition.offset,
            size=partition.size,
            where=where,
            policy=ctx.policy,
        )
        method = mount_method(fstype, ctx.policy, have_fuse2fs=host.fuse2fs)
        device = None
        if method == "kernel":
            device = choose_partition_device(host).attach(
                view, partition.offset, partition.size, claim, ctx
            )
    log.info(
        "partitions_mapped",
        disk=key,
        table=partition.table,
        partition=partition.number,
        filesystem=fstype,
        method=method,
    )
    return MappedDisk(
        prepared=prepared,
        view=str(view),
        partition=partition,
        filesystem=fstype,
        method=method,
        device=device,
    )


def _partition(view: Path, choice: PartitionChoice, key: str) -> GuestPartition:
    size = view.stat().st_size
    with open(view, "rb") as handle:
        try:
            table = read_table(handle, size)
        except PartitionTableInvalid as error:
            raise PartitionTableInvalid(
                f"the partition table of {key} is refused: {error}"
            ) from None
    chosen = choose(table, choice, size, disk=key)
    if chosen is None:
        return GuestPartition(table=table.label, number=None, offset=0, size=size)
    return GuestPartition(
        table=table.label, number=chosen.number, offset=chosen.offset, size=chosen.size
    )
