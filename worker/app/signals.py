"""Worker signal handlers, and `connect_signals`, the one place that connects every handler.

`task_id`, `task_name` and `root_id` are bound to every log line a task writes and cleared when
it ends. Steps (tasks whose class sets `journaled`) record their start, retries and end in the
journal. Metrics (worker.metrics) and the janitor (worker.app.janitor) have handlers of their own,
connected here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from celery import Task, signals
from celery.utils.dispatch import Signal

from domain.core.redaction import redacted_text
from worker import metrics
from worker.app import janitor
from worker.app.runtime import runtime
from worker.logs import configure_logging
from worker.settings import get_settings
from worker.stores.redis_journal import RedisJournal

log = structlog.get_logger(__name__)


def journal() -> RedisJournal:
    current = runtime()
    return RedisJournal(current.redis, current.settings.result_expires)


def _root_id(task: Task) -> str:
    return str(task.request.root_id or task.request.id)


def task_started(task_id: str, task: Task, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        task_id=task_id, task_name=task.name, root_id=_root_id(task)
    )
    if getattr(task, "journaled", False):
        journal().started(_root_id(task), task_id, task.name, task.request.hostname or "")


def task_failed(sender: Task, task_id: str, exception: BaseException, **_: Any) -> None:
    if getattr(sender, "journaled", False):
        journal().finished(
            _root_id(sender),
            task_id,
            sender.name,
            "FAILURE",
            redacted_text(f"{type(exception).__name__}: {exception}"),
        )
        _announce_operation_failed(sender, task_id, exception)


def operation_id(chain: Any) -> str | None:
    """The id the caller waits on, from a request's remaining chain (Celery keeps it reversed:
    the first element runs last); None when there is no step after this one."""
    if not chain:
        return None
    options = chain[0].get("options", {}) if isinstance(chain[0], dict) else {}
    task_id = options.get("task_id")
    return str(task_id) if task_id else None


def _announce_operation_failed(task: Task, task_id: str, exception: BaseException) -> None:
    """A step failed before the last one: tell monitors the operation failed, under its id.

    Celery stores the failure under every id of the chain after the failed step, but sends
    events only for the step that ran. Flower knows the operation's id from the client's
    `task-sent` event (named after the entry task) and would show it PENDING forever; a
    `task-failed` event under that id shows it failed, with the error.
    """
    operation = operation_id(task.request.chain)
    if operation is None or operation == task_id:
        return
    announce_failure(task.app, operation, exception, hostname=task.request.hostname)


def announce_failure(
    app: Any, task_id: str, exception: BaseException, hostname: str | None = None
) -> None:
    """Send `task-failed` for `task_id` (best effort: monitoring never fails the caller)."""
    try:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(
                "task-failed",
                uuid=task_id,
                retry=False,
                exception=redacted_text(f"{type(exception).__name__}({str(exception)!r})"),
                traceback="",
            )
    except Exception as error:
        log.warning("operation_failure_not_announced", task_id=task_id, error=str(error))


def task_ended(task_id: str, task: Task, state: str | None = None, **_: Any) -> None:
    try:
        if getattr(task, "journaled", False) and state in ("SUCCESS", "RETRY"):
            journal().finished(_root_id(task), task_id, task.name, state)  # type: ignore[arg-type]
    finally:
        structlog.contextvars.clear_contextvars()


def setup_logging(loglevel: str | None = None, **_: Any) -> None:
    settings = get_settings()
    configure_logging(level=loglevel or settings.log_level, log_format=settings.log_format)


def connect_signals() -> None:
    """Connect every handler of the runtime to Celery's signals (once per process: each has a
    dispatch_uid). `create_app` calls this; nothing is connected by importing a module."""
    handlers: list[tuple[Signal, Callable[..., Any]]] = [
        (signals.setup_logging, setup_logging),
        # log context and the step journal
        (signals.task_prerun, task_started),
        (signals.task_failure, task_failed),
        (signals.task_postrun, task_ended),
        # metrics
        (signals.task_prerun, metrics.step_started),
        (signals.task_postrun, metrics.step_ended),
        (signals.task_retry, metrics.step_retried),
        (signals.worker_init, metrics.serve_metrics),
        (signals.worker_process_shutdown, metrics.pool_process_ended),
        # the janitor: what dead workers left on this host, released when a worker starts
        (signals.worker_ready, janitor.release_orphans_at_start),
    ]
    for signal, handler in handlers:
        signal.connect(handler, dispatch_uid=f"imgprep:{handler.__module__}.{handler.__name__}")
