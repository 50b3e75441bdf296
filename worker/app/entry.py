"""The base of entry tasks: they record their canvas's plan in the journal, then hand their
task id over to the canvas, so the caller waits on the id it sent for the operation's result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Task
from redis.exceptions import RedisError

from domain.core.errors import CoordinationUnavailable, InvalidRequest
from domain.core.journal import PlannedStep
from worker.app.publishing import requeued_unless_published
from worker.app.redacting import RedactedArguments
from worker.app.runtime import runtime
from worker.app.signals import journal
from worker.app.taskbase import skip_if_ended_before
from worker.delivery.hosts import require_live_host

REQUEST = "request"


def the_request(
    task_name: str, args: Sequence[Any], kwargs: dict[str, Any], *, required: bool
) -> Any:
    """The one argument of an entry task's call: its request, given positionally or as
    `request=`. Any other shape (two arguments, an unknown keyword, none when one is required)
    is an InvalidRequest naming what was sent."""
    unknown = sorted(set(kwargs) - {REQUEST})
    given = len(args) + (REQUEST in kwargs)
    if unknown:
        problem = f"unknown keyword argument(s) {', '.join(unknown)}"
    elif given > 1:
        problem = f"{len(args)} positional arguments" + (
            " and request=" if REQUEST in kwargs else ""
        )
    elif given == 0 and required:
        problem = "no request"
    else:
        return args[0] if args else kwargs.get(REQUEST)
    raise InvalidRequest(
        f"invalid call of {task_name}: it takes one argument, the request object; got {problem}"
    )


class EntryTask(RedactedArguments):
    """An operation's entry point, never retried itself.

    Its call shape is checked here, in the worker, so that a control plane that sends two
    arguments or an unknown keyword gets InvalidRequest stored as the task's failure (Celery's
    own `typing` check runs only in Python senders that hold the task object; in the worker
    Python would raise TypeError)."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    typing = True
    request_required = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        skip_if_ended_before(self)  # the operation ended: its message came back after all
        request = the_request(self.name, args, kwargs, required=self.request_required)
        if request is None and not self.request_required:
            return super().__call__()
        return super().__call__(request)


class _CanvasOwnsTheResult:
    """The app's result backend as an entry task that handed its id over sees it: its own
    success is not stored (the canvas's last step stores the operation's result under that
    id); everything else — failures, states — goes to the real backend."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def mark_as_done(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class CanvasEntryTask(EntryTask):
    """An entry task that hands its task id over to the canvas it builds (`hand_over`).

    This is `Task.replace` for a plain message without its cost: replace raises Ignore, and
    Celery then formats a traceback of every operation (a fifth of a cache-hit prepare's CPU
    in the pool). The entry task returns instead; its success is neither stored (see
    `_CanvasOwnsTheResult`) nor announced (`send_events = False`: the steps' events are what
    monitors show under the id). A failure of the entry task itself (an invalid request) is
    stored as usual and announced by `on_failure`.
    """

    abstract = True
    send_events = False

    @property
    def backend(self) -> Any:
        return _CanvasOwnsTheResult(self.app.backend)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        self.send_event(
            "task-failed", retry=False, name=self.name, exception=repr(exc), traceback=str(einfo)
        )


def target_host(requested: str | None) -> str:
    """The host an operation's canvas runs on: the request's, else this worker's own. A host no
    live worker serves is refused at once (HostUnavailable), before anything is pinned or
    queued for it (worker.delivery.hosts)."""
    current = runtime()
    host = requested or current.settings.host_id
    try:
        require_live_host(host, current.settings, current.redis)
    except RedisError as error:
        raise CoordinationUnavailable(f"Redis unavailable for the host registry: {error}") from None
    return host


def hand_over(task: Task, canvas: Any) -> None:
    """Send `canvas`, whose last step already carries `task`'s id, in `task`'s place.

    A message that links callbacks or errbacks, or is part of a chain, group or chord, goes
    through Celery's own `Task.replace`, which carries those over to the canvas. A canvas that
    Redis cannot take within `redis_outage_seconds` sends the entry task's message back.
    """
    request = task.request
    with requeued_unless_published(f"the canvas of {task.name}"):
        if request.callbacks or request.errbacks or request.chain or request.chord or request.group:
            task.replace(canvas)
            return
        canvas.apply_async()


def plan(task: Task, canvas: Any, done: Sequence[str] = ()) -> None:
    """Record the steps of `canvas` in the journal; `done` names steps the entry task itself
    found already done (a cache hit), recorded as succeeded before the canvas's."""
    root_id = str(task.request.root_id or task.request.id)
    record = journal()
    finished = [
        PlannedStep(name=name, task_id=f"{root_id}:{name.removeprefix('imgprep.')}")
        for name in done
    ]
    record.plan(
        root_id,
        [
            *finished,
            *(
                PlannedStep(
                    name=step.task, task_id=step.options["task_id"], queue=step.options.get("queue")
                )
                for step in canvas.tasks
            ),
        ],
        done=finished,
        worker=task.request.hostname or "",
    )
