"""The worker's process pool: Celery's prefork pool, whose start survives a pool process killed
from outside while the worker starts.

Celery checks once, as its event loop starts, that no pool process has exited
(`did_start_ok`): one that did is taken for a process that could not start (an import error),
and the whole worker stops ("Unrecoverable error: WorkerLostError('Could not start worker
processes')"). A pool process killed by SIGKILL in those first seconds (the OOM killer, an
operator) is no such thing: the pool replaces it as it replaces any process killed later.
Only processes that exited on their own, or on another signal, still stop the start.
"""

from __future__ import annotations

import signal

from celery.concurrency import prefork

POOL = "worker.app.pool:TaskPool"


class TaskPool(prefork.TaskPool):  # type: ignore[misc]
    """Celery's prefork pool; a process SIGKILLed while the worker starts is replaced."""

    def did_start_ok(self) -> bool:
        codes = [process.exitcode for process in list(self._pool._pool)]
        return all(code is None or code == -signal.SIGKILL for code in codes)
