"""Choosing how qemu-img writes a converted image.

`qemu-img convert -t none` opens the target with O_DIRECT, which keeps the host page cache out of
the way and leaves the data on disk when the command ends. Filesystems without O_DIRECT
(tmpfs) refuse that, so there the target is written with `writeback`, which still fsyncs at the
end (Nova's privsep `convert_image`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import uuid
from pathlib import Path


@functools.cache
def supports_direct_io(directory: Path) -> bool:
    """Whether files in `directory` can be opened with O_DIRECT (probed once per directory)."""
    probe = directory / f".imgprep-directio-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return False
        raise
    try:
        os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    return True


def cache_mode_for(directory: Path) -> str:
    """The qemu-img target cache mode for writing into `directory`."""
    return "none" if supports_direct_io(directory) else "writeback"
