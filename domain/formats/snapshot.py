"""Cold snapshots (Nova's `snapshot_extract`): an instance disk as a standalone image.

The disk's format comes from its disk.info record, never from a probe of a file the guest has
written; the target is a path under the snapshots directory. The conversion itself is the
convert step's (domain.formats.conversion): qemu-img follows the overlay's backing file, which
imgprep wrote itself, and writes one self-contained image.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from domain.core import diskinfo
from domain.core.errors import InvalidRequest
from domain.core.paths import child, instance_dir, lexical_child, lexical_under, path_under
from domain.core.ports import LockFactory, Progress, no_progress
from domain.core.runner import Limits, Runner
from domain.formats.conversion import convert_image
from domain.formats.snapshot_models import ConvertedImage, ConvertJob, SnapshotRequest


def snapshot_source(
    request: SnapshotRequest, *, instances_dir: Path, snapshots_dir: Path
) -> ConvertJob:
    """The snapshot_source step: the conversion that extracts the disk of `request` to its
    target, planned on the disk's host."""
    structlog.contextvars.bind_contextvars(instance_id=request.instance_id)
    if request.target is None or request.backend is not None:
        raise InvalidRequest("snapshot_source extracts a file disk to a target")
    lexical_under(snapshots_dir, request.target)  # the whole request, before the machine
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


def confirm_job(job: ConvertJob, *, instances_dir: Path, snapshots_dir: Path) -> ConvertJob:
    """`job`, if it is a snapshot's conversion: its source an instance disk read in the format
    its disk.info records, its target under the snapshots directory. The convert step takes its
    job from the broker; a job naming another file, or a format the guest could have chosen by
    writing a header into a raw disk, is refused."""
    # the whole job as its words go, before anything on the machine is looked at: a job that
    # is invalid is refused as invalid whatever exists (and says nothing of what does)
    source = Path(job.source)
    if source != lexical_child(lexical_child(instances_dir, source.parent.name), source.name):
        raise InvalidRequest(f"the source {source} is not an instance disk under {instances_dir}")
    if lexical_under(snapshots_dir, job.target) != Path(job.target):
        raise InvalidRequest(f"the target {job.target} is not a path under {snapshots_dir}")
    directory = instance_dir(instances_dir, source.parent.name)
    if source != child(directory, source.name):
        raise InvalidRequest(f"the source {source} is not an instance disk under {instances_dir}")
    recorded = diskinfo.require_format(directory, source.name)
    if recorded != job.source_format:
        raise InvalidRequest(
            f"the source {source} is recorded as a {recorded} disk, not {job.source_format}"
        )
    if path_under(snapshots_dir, job.target) != Path(job.target):
        raise InvalidRequest(f"the target {job.target} is not a path under {snapshots_dir}")
    return job


def convert(
    job: ConvertJob,
    *,
    instances_dir: Path,
    snapshots_dir: Path,
    runner: Runner,
    locks: LockFactory,
    limits: Limits,
    progress: Progress = no_progress,
) -> ConvertedImage:
    """The convert step: `job`, once confirmed as a snapshot's conversion (`confirm_job`), run
    (domain.formats.conversion)."""
    confirmed = confirm_job(job, instances_dir=instances_dir, snapshots_dir=snapshots_dir)
    return convert_image(
        confirmed,
        source_roots=(instances_dir,),
        target_roots=(snapshots_dir,),
        runner=runner,
        locks=locks,
        limits=limits,
        progress=progress,
    )
