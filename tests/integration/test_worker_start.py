"""A worker's start: a pool process killed from outside while the worker starts does not stop
it (worker/app/pool.py), and a worker that cannot start exits with a failure status, so that a
supervisor that restarts on failure restarts it (worker/cli/run.py)."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

from tests.integration.conftest import Cluster, ClusterFactory
from worker.cli.demo.worker_processes import WorkerProcess, start_worker


def starting_worker(cluster: Cluster, name: str) -> WorkerProcess:
    """A worker started without waiting for it; the cluster stops it."""
    nodename = f"{name}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    worker = start_worker(
        nodename=nodename,
        log_path=cluster.root / "logs" / f"{nodename}.log",
        env=cluster.env,
        concurrency=2,
    )
    cluster.workers.append(worker)
    return worker


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (R, S, T, Z, ...); "" once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def is_ready(worker: WorkerProcess) -> bool:
    """Whether the worker logged "ready.": Celery checks its pool processes right after that."""
    return f"{worker.nodename} ready." in worker.log_path.read_text(errors="replace")


def signal_pool_process_before_ready(
    worker: WorkerProcess, signum: int, timeout: float = 60
) -> int | None:
    """Send `signum` to the first pool process of `worker` while its main process has not yet
    checked its pool (Celery checks once, right after logging "ready."); the pool process's pid,
    or None when the worker was ready before a pool process could be caught (the race is lost;
    try another worker).

    The main process is stopped (SIGSTOP) from the moment a fork of it is seen until that
    process has died, so the signal always lands before the check, however loaded the machine.
    A pool process is a fork of the main process that keeps its command line; a command the
    worker runs (the janitor's losetup at start) is a fork too, for the moment before its exec,
    so a fork counts as a pool process only once it kept that command line for a while."""
    deadline = time.monotonic() + timeout
    # The command line the worker's main process has once it runs (before its exec it still
    # has the test's)
    argv = worker.process.args
    assert isinstance(argv, list)
    own = b"".join(os.fsencode(arg) + b"\0" for arg in argv)
    while time.monotonic() < deadline:
        if any(cmdline(pid) == own for pid in worker.pool_pids()):
            os.kill(worker.pid, signal.SIGSTOP)
            try:
                time.sleep(0.5)  # a command's fork reaches its exec (the main process is stopped)
                pool = [pid for pid in worker.pool_pids() if cmdline(pid) == own]
                if is_ready(worker):
                    return None
                if pool:
                    os.kill(pool[0], signum)
                    while process_state(pool[0]) not in ("Z", "") and time.monotonic() < deadline:
                        time.sleep(0.005)  # a dying process becomes a zombie within milliseconds
                    return pool[0]
            finally:
                os.kill(worker.pid, signal.SIGCONT)
        assert worker.process.poll() is None, f"the worker exited; see {worker.log_path}"
        time.sleep(0.002)  # polling /proc for a process that appears within milliseconds
    raise AssertionError(f"no pool process of {worker.nodename} after {timeout:.0f} s")


def signal_a_starting_worker(cluster: Cluster, name: str, signum: int) -> tuple[WorkerProcess, int]:
    """A worker of `cluster` whose first pool process got `signum` before the worker checked its
    pool, and that process's pid (a worker that was ready first is stopped; up to five tries)."""
    for _ in range(5):
        worker = starting_worker(cluster, name)
        signalled = signal_pool_process_before_ready(worker, signum)
        if signalled is not None:
            return worker, signalled
        worker.stop()
    raise AssertionError("five workers in a row were ready before a pool process was seen")


def test_a_pool_process_killed_while_the_worker_starts_does_not_stop_it(
    cluster_factory: ClusterFactory,
) -> None:
    # Given a cluster with a worker starting
    cluster = cluster_factory("killed-at-start")

    # When one of its pool processes is killed before the worker has checked its pool
    worker, killed = signal_a_starting_worker(cluster, "starting", signal.SIGKILL)

    # Then the worker still comes up, with a new pool process, and runs a task
    worker.wait_ready(cluster.app, timeout=60)
    assert killed not in worker.pool_pids()
    answer = cluster.app.send_task("imgprep.ping", queue="imgprep").get(timeout=60)
    assert answer["pid"] in worker.pool_pids()
    cluster.assert_clean()


def test_a_worker_that_cannot_start_exits_with_a_failure_status(
    cluster_factory: ClusterFactory,
) -> None:
    # Given a cluster with a worker starting
    cluster = cluster_factory("crashed-at-start")

    # When a pool process crashes as it starts (abort: not a kill from outside), before the
    # worker has checked its pool
    worker, _ = signal_a_starting_worker(cluster, "crashing", signal.SIGABRT)

    # Then the worker stops ("Could not start worker processes") with a failure status
    status = worker.process.wait(timeout=60)
    assert status != 0, f"the worker exited 0; see {worker.log_path}"
    cluster.assert_clean()
