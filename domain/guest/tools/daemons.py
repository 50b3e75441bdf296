"""Finding, stopping and waiting for the helper daemons a mount leaves running.

fuse2fs and qemu-storage-daemon detach from the worker, so they outlive the step that started
them (and the worker, if it crashes). They are found again by their command line, which names a
path unique to one instance disk; their exit is awaited on a pidfd, not by polling.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def find(program: str, path: Path) -> list[int]:
    """Pids of running `program` processes whose command line names `path`."""
    marker = str(path)
    quoted = f'"{marker}"'
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [
                a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")
            ]
        except OSError:
            continue
        if (
            argv
            and Path(argv[0]).name == program
            and any(arg == marker or quoted in arg for arg in argv[1:])
        ):
            pids.append(int(entry.name))
    return pids


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` seconds for every pid to exit; the pids still running."""
    deadline = time.monotonic() + timeout
    remaining = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            left = max(0.0, deadline - time.monotonic())
            if not poller.poll(int(left * 1000)):
                remaining.append(pid)
        finally:
            os.close(fd)
    return remaining


def stop(pids: list[int], timeout: float) -> list[int]:
    """SIGTERM, wait up to `timeout`; SIGKILL what is left. The pids that had to be killed."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return kill(wait_gone(pids, timeout))


def kill(pids: list[int]) -> list[int]:
    """SIGKILL `pids` and wait for them; the pids that were still there to kill."""
    killed = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    if killed:
        log.warning("daemons_killed", pids=killed)
        wait_gone(killed, 10)
    return killed
