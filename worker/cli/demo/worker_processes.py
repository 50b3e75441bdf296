"""Starting and stopping `imgprep worker` processes: for the demo, the tests and benchmarks.

A worker is started in its own session, so it and its pool can be ended together by the
process group of the pid we started, never by name. Readiness is a real round trip through the
broker (a control ping to that node), not a log line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from celery import Celery


@dataclass
class WorkerProcess:
    """A running `imgprep worker` started by us."""

    process: subprocess.Popen[bytes]
    nodename: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def pool_pids(self) -> list[int]:
        """The pids of the worker's pool processes: children of the main process forked from it
        (the same command line), not the privileged helper it may have started."""
        pids: list[int] = []
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            main = Path(f"/proc/{self.pid}/cmdline").read_bytes()
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                text = (task / "children").read_text()
                pids.extend(int(pid) for pid in text.split() if _cmdline(int(pid)) == main)
        return pids

    def helper_pids(self) -> list[int]:
        """The pids of the privileged helpers this worker started (children running `helper`)."""
        pids: list[int] = []
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                text = (task / "children").read_text()
                pids.extend(int(pid) for pid in text.split() if b"\0helper\0" in _cmdline(int(pid)))
        return pids

    def wait_ready(self, celery_app: Celery, timeout: float = 60.0) -> None:
        """Block until the worker answers a control ping through the broker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.nodename} exited early; see {self.log_path}")
            replies = celery_app.control.ping(destination=[self.nodename], timeout=0.5)
            if any(self.nodename in reply for reply in replies):
                return
        raise TimeoutError(
            f"worker {self.nodename} not ready after {timeout:.0f} s; see {self.log_path}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM); the whole process group is killed if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and its pool: the group led by the pid we started."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def stop_workers(workers: Sequence[WorkerProcess], timeout: float = 30.0) -> None:
    """WorkerProcess.stop for several workers at once: SIGTERM to each, then wait for each
    within one `timeout` (they shut down side by side); the group of any that lingers is
    killed."""
    for worker in workers:
        if worker.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        worker.kill()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def start_worker(
    *,
    nodename: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    concurrency: int = 2,
    extra_args: tuple[str, ...] = (),
) -> WorkerProcess:
    """Start `imgprep worker` as a separate process in its own session."""
    argv = [
        sys.executable,
        "-m",
        "worker.cli",
        "worker",
        "--hostname",
        nodename,
        "--concurrency",
        str(concurrency),
        *extra_args,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env if env is not None else os.environ),
            start_new_session=True,
        )
    return WorkerProcess(process=process, nodename=nodename, log_path=log_path)
