"""Progress of a long step as a Celery custom state, `PROGRESS`, throttled.

The meta is `{"step": ..., "done": bytes, "total": bytes or null, "percent": float or null}`,
stored in the result backend under the step's task id, where `imgprep status`, the CLI's
progress bars and the tests read it.

Flower knows only task events, not the result backend, so each report is also sent as a custom
task event `task-progress`. celery.events.state turns an unknown `task-<name>` event into the
state `<NAME>` (PROGRESS, ordered after STARTED and before SUCCESS) and copies the event's fields
onto the task; the meta travels in the `result` field, the one Flower's pages and HTTP API show,
as JSON — as in the result backend, where a PROGRESS state's result is its meta.
"""

from __future__ import annotations

import json
import time

import structlog
from celery import Task
from redis.exceptions import RedisError

PROGRESS = "PROGRESS"
PROGRESS_EVENT = "task-progress"

log = structlog.get_logger(__name__)


class TaskProgress:
    """A `domain.core.ports.Progress` that updates the task's state a few times a second at most."""

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
        meta = {"step": self.step, "done": done, "total": total, "percent": percent}
        try:
            self.task.update_state(state=PROGRESS, meta=meta)
        except RedisError as error:  # progress is best effort; the step goes on without it
            log.info("progress_not_stored", step=self.step, error=str(error))
        self._send_event(meta)

    def _send_event(self, meta: dict[str, object]) -> None:
        if not self.task.app.conf.worker_send_task_events:
            return
        try:
            self.task.send_event(PROGRESS_EVENT, retry=False, result=json.dumps(meta), **meta)
        except Exception as error:  # monitoring must never fail the step
            log.warning("progress_event_failed", error=str(error))
