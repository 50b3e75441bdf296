"""Cold snapshots (Nova's `snapshot_extract`): an instance disk as a standalone image.

The disk's format comes from its disk.info record, never from a probe of a file the guest has
written; the target is a path under the snapshots directory. The conversion itself is the
convert step's (tasks.convert): qemu-img follows the overlay's backing file, which imgprep wrote
itself, and writes one self-contained image.
"""

from __future__ import annotations

from pathlib import Path

from tasks import diskinfo
from tasks.paths import instance_dir, path_under
from tasks.snapshot_models import ConvertJob, SnapshotRequest


def plan_snapshot(
    request: SnapshotRequest, *, instances_dir: Path, snapshots_dir: Path
) -> ConvertJob:
    """The conversion that extracts the disk of `request` to its target."""
    directory = instance_dir(instances_dir, request.instance_id)
    source_format = diskinfo.require_format(directory, request.disk_name)
    target = path_under(snapshots_dir, request.target, create_parents=True)
    return ConvertJob(
        source=str(directory / request.disk_name),
        source_format=source_format,
        target=str(target),
        target_format=request.format,
        compress=request.compress,
    )
