"""Sparse files: copies that keep holes, and how much of a file is really allocated.

A raw disk of 20 GiB with 1 GiB of data must cost 1 GiB of disk. Copies go through
`cp --sparse=always` (which also punches holes where the source has written zeros) or qemu-img;
never through a read/write loop that would fill the holes.
"""

from __future__ import annotations

import os
from pathlib import Path

from domain.core.runner import CommandError, Runner
from domain.core.space import disk_full, out_of_space


def sparse_copy(runner: Runner, source: Path, target: Path) -> None:
    """Copy `source` to `target` keeping holes (a reflink where the filesystem offers one)."""
    try:
        runner.run(["cp", "--sparse=always", "--reflink=auto", "--", str(source), str(target)])
    except CommandError as error:
        if error.result is not None and out_of_space(error.result.stderr):
            raise disk_full(target, os.stat(source).st_blocks * 512) from None
        raise


def allocated_bytes(path: Path) -> int:
    """Bytes the filesystem allocated to `path` (st_blocks * 512), holes excluded."""
    return os.stat(path).st_blocks * 512
