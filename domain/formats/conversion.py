"""`qemu-img convert` as a step: a new image from an existing one, written once, with progress.

The target's cache mode is chosen by an O_DIRECT probe of its directory: `-t none` keeps the
host page cache out of the way and leaves the data on disk when the command ends; filesystems
without O_DIRECT (tmpfs) refuse that, so there the target is written with `writeback`, which
still fsyncs at the end (Nova's privsep `convert_image`). The source format is always pinned.
The target is published like every artifact (domain.core.publish): staged in a temporary of this
holder's own, then its description renamed to `<target>.json` and the image to `<target>`; a
target that exists from another job (or whose description does not describe it) is a conflict.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import structlog
from pydantic import ValidationError

from domain.core.errors import DiskConflict, InvalidRequest
from domain.core.paths import inside
from domain.core.ports import LockFactory, Progress, no_progress
from domain.core.publish import Staged, publish_once, record_path
from domain.core.runner import Limits, Runner
from domain.core.sparse import allocated_bytes
from domain.formats import qemu_img
from domain.formats.snapshot_models import ConvertedImage, ConvertJob

log = structlog.get_logger(__name__)

CacheMode = Literal["none", "writeback"]


def supports_direct_io(directory: Path) -> bool:
    """Whether files in `directory` can be opened with O_DIRECT.

    Probed at every call: three system calls next to a qemu-img convert, and no stale answer
    when another filesystem is mounted on the directory (or reuses its device number)."""
    probe = directory / f".imgprep-directio-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError as error:
        if error.errno == errno.EINVAL:
            with contextlib.suppress(FileNotFoundError):
                probe.unlink()  # some filesystems create the file before refusing O_DIRECT
            return False
        raise
    try:
        os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    return True


def cache_mode_for(directory: Path) -> CacheMode:
    """The qemu-img target cache mode for writing into `directory`."""
    return "none" if supports_direct_io(directory) else "writeback"


def convert_image(
    job: ConvertJob,
    *,
    source_roots: Sequence[Path],
    target_roots: Sequence[Path],
    runner: Runner,
    locks: LockFactory,
    limits: Limits,
    progress: Progress = no_progress,
) -> ConvertedImage:
    """Make sure `job.target` holds the conversion of `job.source` and describe it."""
    source, target = Path(job.source), Path(job.target)
    _require_inside(source, source_roots, "source")
    _require_inside(target, target_roots, "target")
    if not source.is_file():
        raise InvalidRequest(f"the source {source} does not exist")

    def write(part: Path, mode: CacheMode) -> None:
        virtual = qemu_img.info(runner, source, job.source_format, limits).virtual_size
        qemu_img.convert(
            runner,
            source,
            part,
            source_format=job.source_format,
            target_format=job.target_format,
            cache_mode=mode,
            compress=job.compress,
            on_progress=lambda percent: progress(int(virtual * percent / 100), virtual),
        )

    return publish_conversion(
        job, write, runner=runner, locks=locks, limits=limits, event="image_converted"
    )


def publish_conversion(
    job: ConvertJob,
    write: Callable[[Path, CacheMode], None],
    *,
    runner: Runner,
    locks: LockFactory,
    limits: Limits,
    event: str,
    what: str = "conversion",
) -> ConvertedImage:
    """Make sure `job.target` holds the image `job` describes, and describe it: a target there
    already is the answer when its description is this job's, a conflict otherwise; else `write`
    converts into a temporary of this holder's (with the target directory's cache mode), which is
    described and published with its description (domain.core.publish, under the lease
    `image:<target>`). The source may be a file or another protocol's image (an RBD disk)."""
    target = Path(job.target)

    def find() -> ConvertedImage | None:
        if not target.exists() and not target.is_symlink():
            return None
        existing = read_description(target)
        if existing is None or (
            existing.source,
            existing.source_format,
            existing.format,
            existing.compressed,
        ) != (job.source, job.source_format, job.target_format, job.compress):
            raise DiskConflict(
                f"{target} already exists and is not this {what} of {job.source}; "
                "choose another target"
            )
        return existing

    def stage(part: Path) -> Staged[ConvertedImage]:
        mode = cache_mode_for(target.parent)
        write(part, mode)
        written = qemu_img.info(runner, part, job.target_format, limits)
        result = ConvertedImage(
            path=str(target),
            format=job.target_format,
            virtual_size=written.virtual_size,
            size_bytes=part.stat().st_size,
            allocated_bytes=allocated_bytes(part),
            sha256=file_sha256(part),
            compressed=job.compress,
            source=job.source,
            source_format=job.source_format,
            cache_mode=mode,
        )
        log.info(
            event,
            source=job.source,
            target=str(target),
            format=job.target_format,
            cache_mode=mode,
            compressed=job.compress,
            bytes=result.size_bytes,
        )
        return Staged(file=part, result=result, record=result.model_dump_json(indent=1))

    return publish_once(
        target, find=find, lease=locks(f"image:{target}"), stage=stage, with_record=True
    )


def file_sha256(path: Path, chunk: int = 4 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_description(target: Path) -> ConvertedImage | None:
    """The description of the image at `target`, if it reads and has the image's size."""
    try:
        described = ConvertedImage.model_validate_json(record_path(target).read_text("utf-8"))
        size = target.stat().st_size
    except (FileNotFoundError, ValidationError):
        return None
    return described if described.size_bytes == size else None


def _require_inside(path: Path, roots: Sequence[Path], what: str) -> None:
    if not path.is_absolute() or not any(inside(root, path) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise InvalidRequest(f"the {what} {path} is outside the configured roots ({allowed})")
