"""Worker signal handlers: log context per task, and the step journal.

`task_id`, `task_name` and `root_id` are bound to every log line a task writes and cleared when
it ends. Steps (tasks whose class sets `journaled`) record their start, retries and end.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task, signals

from tasks.redaction import redacted_text
from worker.journal import Journal
from worker.runtime import runtime

log = structlog.get_logger(__name__)


def journal() -> Journal:
    current = runtime()
    return Journal(current.redis, current.settings.result_expires)


def _root_id(task: Task) -> str:
    return str(task.request.root_id or task.request.id)


@signals.task_prerun.connect
def _task_started(task_id: str, task: Task, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        task_id=task_id, task_name=task.name, root_id=_root_id(task)
    )
    if getattr(task, "journaled", False):
        journal().started(_root_id(task), task_id, task.name, task.request.hostname or "")


@signals.task_failure.connect
def _task_failed(sender: Task, task_id: str, exception: BaseException, **_: Any) -> None:
    if getattr(sender, "journaled", False):
        journal().finished(
            _root_id(sender),
            task_id,
            sender.name,
            "FAILURE",
            redacted_text(f"{type(exception).__name__}: {exception}"),
        )


@signals.task_postrun.connect
def _task_ended(task_id: str, task: Task, state: str | None = None, **_: Any) -> None:
    try:
        if getattr(task, "journaled", False) and state in ("SUCCESS", "RETRY"):
            journal().finished(_root_id(task), task_id, task.name, state)  # type: ignore[arg-type]
    finally:
        structlog.contextvars.clear_contextvars()


# The janitor releases devices that dead workers left on this host when a worker starts.
from worker import janitor as _janitor  # noqa: E402, F401
