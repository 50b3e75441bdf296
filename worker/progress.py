"""Progress of a long step as a Celery custom state, `PROGRESS`, throttled.

The meta is `{"step": ..., "done": bytes, "total": bytes or null, "percent": float or null}`,
stored in the result backend under the step's task id, where `imgprep status`, the CLI's
progress bars and the tests read it.
"""

from __future__ import annotations

import time

import structlog
from celery import Task
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

PROGRESS = "PROGRESS"


class TaskProgress:
    """A `tasks.ports.Progress` that updates the task's state a few times a second at most."""

    def __init__(self, task: Task, step: str, interval: float = 0.25) -> None:
        self.task = task
        self.step = step
        self.interval = interval
        self._last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        if now - self._last < self.interval and not finished:
            return
        self._last = now
        if self.task.request.called_directly or not self.task.request.id:
            return
        percent = round(100.0 * done / total, 1) if total else None
        try:
            self.task.update_state(
                state=PROGRESS,
                meta={"step": self.step, "done": done, "total": total, "percent": percent},
            )
        except RedisError as error:  # progress is best effort; the step goes on without it
            log.info("progress_not_stored", step=self.step, error=str(error))
