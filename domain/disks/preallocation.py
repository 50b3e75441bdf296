"""Preallocation of instance disks, as Nova's `preallocate_images = space`.

`fallocate -n -l SIZE` reserves the blocks of a disk's full virtual size without writing them
or changing its length, so a guest cannot later fail on a full filesystem. Whether a filesystem
supports fallocate(2) is probed once per filesystem (device), the way Nova probes once per class.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import structlog

from domain.core.runner import CommandError, Runner
from domain.core.space import disk_full, out_of_space

log = structlog.get_logger(__name__)

_SUPPORTED: dict[int, bool] = {}


def can_fallocate(directory: Path, runner: Runner) -> bool:
    """Whether the filesystem of `directory` supports fallocate (probed once per filesystem)."""
    device = os.stat(directory).st_dev
    if device not in _SUPPORTED:
        probe = directory / f".imgprep-fallocate-{uuid.uuid4().hex}"
        try:
            probe.touch(mode=0o600, exist_ok=False)  # fallocate -n opens, never creates
            result = runner.run(["fallocate", "-n", "-l", "1", str(probe)], check=False)
            _SUPPORTED[device] = result.returncode == 0
        finally:
            with contextlib.suppress(FileNotFoundError):
                probe.unlink()
        if not _SUPPORTED[device]:
            log.warning("preallocation_unsupported", directory=str(directory))
    return _SUPPORTED[device]


def preallocate(path: Path, size: int, runner: Runner) -> bool:
    """Reserve `size` bytes for `path` if its filesystem can; whether it did."""
    if not can_fallocate(path.parent, runner):
        return False
    try:
        runner.run(["fallocate", "-n", "-l", str(size), str(path)])
    except CommandError as error:
        if error.result is not None and out_of_space(error.result.stderr):
            raise disk_full(path, size) from None
        # another filesystem now (a remount): learn it, and leave the disk sparse
        _SUPPORTED[os.stat(path.parent).st_dev] = False
        log.warning("preallocation_failed", path=str(path), error=str(error))
        return False
    return True
