"""Writing a streamed image to disk fast, sparse and durable.

Three things overlap instead of following each other: the next chunk is read from the source
(a read-ahead thread, domain.cache.transfer), the current chunk is hashed (a hashing thread; hashlib
releases the GIL), and it is written. Runs of zero blocks are skipped, so a raw image lands
sparse. Writeback of what was written is started every few dozen MiB (Linux
`sync_file_range(SYNC_FILE_RANGE_WRITE)` queues dirty pages for writeback without waiting for
them), so the disk writes while the network reads, and the final fsync — the image must be on
disk before it is published — has little left to flush. (`posix_fadvise(DONTNEED)` would also
start writeback, but it waits on pages already under writeback: measured here, it made a 1 GiB
download twice as slow.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from domain.core.space import space_guard

BLOCK = 64 * 2**10  # the unit of hole detection
WRITEBACK_EVERY = 32 * 2**20
_ZEROS = bytes(BLOCK)
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    """sync_file_range(2) from libc: start writeback of a range without waiting for it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux: the final fsync does all the flushing
        return lambda fd, offset, length: None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

    def start_writeback(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: errors change nothing

    return start_writeback


start_writeback = _load_sync_file_range()


class ImageWriter:
    """Writes chunks at increasing offsets into a new file; `finish()` makes it durable.

    `expected_size` (the source's announced length, when it is known) is what a full disk is
    reported against."""

    def __init__(self, dest: Path, expected_size: int | None) -> None:
        self.dest = dest
        self.expected_size = expected_size
        self.size = 0
        self._digest = hashlib.sha256()
        self._hashing: Future[None] | None = None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self._flushed_to = 0
        self._fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def write(self, chunk: bytes) -> None:
        if self._hashing is not None:
            self._hashing.result()  # keep the digest in order: one update at a time
        self._hashing = self._hasher.submit(self._digest.update, chunk)
        self._write_sparse(chunk, self.size)
        self.size += len(chunk)
        if self.size - self._flushed_to >= WRITEBACK_EVERY:
            start_writeback(self._fd, self._flushed_to, self.size - self._flushed_to)
            self._flushed_to = self.size

    def finish(self) -> str:
        """Set the final size, wait for the data to reach the disk; the sha256 of all bytes."""
        if self._hashing is not None:
            self._hashing.result()
        with space_guard(self.dest, self.expected_size or self.size):
            os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        return self._digest.hexdigest()

    def close(self) -> None:
        self._hasher.shutdown(wait=True)
        os.close(self._fd)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_sparse(self, chunk: bytes, offset: int) -> None:
        """Write the non-zero runs of `chunk` at `offset`; runs of zero blocks stay holes."""
        size = len(chunk)
        view = memoryview(chunk)
        start = 0
        while start < size:
            while start < size and chunk.startswith(_ZEROS[: min(BLOCK, size - start)], start):
                start += BLOCK
            end = start
            while end < size and not chunk.startswith(_ZEROS[: min(BLOCK, size - end)], end):
                end += BLOCK
            end = min(end, size)
            if end > start:
                with space_guard(self.dest, self.expected_size):
                    self._pwrite_all(view[start:end], offset + start)
            start = end

    def _pwrite_all(self, data: memoryview, position: int) -> None:
        while data:
            written = os.pwrite(self._fd, data, position)
            data = data[written:]
            position += written
