"""A worker's start: a pool process killed from outside while the worker starts does not stop
it (worker/pool.py), and a worker that cannot start exits with a failure status, so that a
supervisor that restarts on failure restarts it (worker/cli/run.py)."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

from tests.integration.conftest import Cluster, ClusterFactory
from worker.harness.worker_processes import WorkerProcess, start_worker


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


def signal_first_pool_process(worker: WorkerProcess, signum: int, timeout: float = 60) -> int:
    """Send `signum` to the first pool process of `worker` the moment it exists (a fork of the
    main process: the same command line; the worker's other children are tools it runs); its
    pid."""
    deadline = time.monotonic() + timeout
    own = cmdline(worker.pid)
    while time.monotonic() < deadline:
        pool = [pid for pid in worker.pool_pids() if cmdline(pid) == own]
        if pool:
            os.kill(pool[0], signum)
            return pool[0]
        assert worker.process.poll() is None, f"the worker exited; see {worker.log_path}"
        time.sleep(0.002)  # polling /proc for a process that appears within milliseconds
    raise AssertionError(f"no pool process of {worker.nodename} after {timeout:.0f} s")


def test_a_pool_process_killed_while_the_worker_starts_does_not_stop_it(
    cluster_factory: ClusterFactory,
) -> None:
    # Given a worker starting
    cluster = cluster_factory("killed-at-start")
    worker = starting_worker(cluster, "starting")

    # When one of its pool processes is killed as soon as it exists (before the worker is ready)
    killed = signal_first_pool_process(worker, signal.SIGKILL)

    # Then the worker still comes up, with a new pool process, and runs a task
    worker.wait_ready(cluster.app, timeout=60)
    assert killed not in worker.pool_pids()
    answer = cluster.app.send_task("imgprep.ping", queue="imgprep").get(timeout=60)
    assert answer["pid"] in worker.pool_pids()
    cluster.assert_clean()


def test_a_worker_that_cannot_start_exits_with_a_failure_status(
    cluster_factory: ClusterFactory,
) -> None:
    # Given a worker starting
    cluster = cluster_factory("crashed-at-start")
    worker = starting_worker(cluster, "crashing")

    # When a pool process crashes as it starts (abort: not a kill from outside)
    signal_first_pool_process(worker, signal.SIGABRT)

    # Then the worker stops ("Could not start worker processes") with a failure status
    status = worker.process.wait(timeout=60)
    assert status != 0, f"the worker exited 0; see {worker.log_path}"
    cluster.assert_clean()
