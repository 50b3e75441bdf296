"""The base of every imgprep task: retry by error class, one summary log line per step,
requests parsed into models with typed errors.

Transient errors retry with exponential backoff and equal jitter up to `retry.max_retries`;
when retries run out the original error is raised, so the final failure names its class and a
message a person can act on. Everything else fails at once.
"""

from __future__ import annotations

import inspect
import random
import time
import typing
from typing import Any, TypeVar

import structlog
from celery import Task, signature, states
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from domain.cache.references import pending_holder
from domain.core.errors import InvalidRequest, StepTimedOut, TransientError
from worker.app.publishing import requeue, requeued_unless_published
from worker.app.redacting import RedactedArguments
from worker.app.redelivery import ended_before
from worker.settings import RetrySettings, get_settings

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=BaseModel)


def backoff_delay(retries: int, policy: RetrySettings) -> float:
    """Seconds before retry number `retries + 1`: half fixed, half random (equal jitter)."""
    ceiling = min(policy.backoff_max_seconds, policy.backoff_seconds * 2**retries)
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 - jitter, not crypto


def describe_validation(error: ValidationError, what: str = "request") -> str:
    """`invalid request: disk.size_bytes: Input should be greater than 0; ...`"""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in item['loc']) or what}: {item['msg']}" for item in error.errors()
    )
    return f"invalid {what}: {problems}"


def canvas_pin(task: Task) -> str:
    """The pin the canvas of `task` holds on its cached base, by its root task id
    (domain.cache.references.pending_holder)."""
    return pending_holder(str(task.request.root_id or task.request.id))


def parse(model: type[M], data: object, what: str = "request") -> M:
    """Validate wire data into `model`; an invalid payload is a permanent InvalidRequest."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise InvalidRequest(describe_validation(error, what)) from None


class StepTask(RedactedArguments):
    """Base class: acks late, retries TransientError with backoff, logs one line per step."""

    abstract = True
    journaled = True
    acks_late = True
    typing = True
    # A pool process killed mid-step (OOM, SIGKILL) sends the step back at once, as a retry:
    # counted against the retry budget, so a step that kills its process every time (a poison
    # image) ends as a failure instead of circling forever.
    reject_on_worker_lost = True
    retry_on_worker_lost = True
    default_retry_delay = 1

    @property
    def max_retries(self) -> int:
        return get_settings().retry.max_retries

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        skip_if_ended_before(self)
        check_arguments(self, args, kwargs)
        started = time.monotonic()
        try:
            result = super().__call__(*args, **kwargs)
        except SoftTimeLimitExceeded:
            limit = get_settings().step_time_limit
            error = StepTimedOut(
                f"{self.name} ran past its time limit ({limit} s) and was stopped; a step this "
                "long needs a larger IMGPREP_STEP_TIME_LIMIT (and IMGPREP_VISIBILITY_TIMEOUT)"
            )
            log.error(
                "step_failed", error_class="StepTimedOut", error=str(error), seconds=_since(started)
            )
            raise error from None
        except TransientError as error:
            if self.request.called_directly:
                raise
            policy = get_settings().retry
            if not self.will_retry(error):
                log.error(
                    "step_failed",
                    error_class=type(error).__name__,
                    error=str(error),
                    retries=self.request.retries,
                    seconds=_since(started),
                )
                raise
            delay = backoff_delay(self.request.retries, policy)
            log.warning(
                "step_retrying",
                error_class=type(error).__name__,
                error=str(error),
                retry=self.request.retries + 1,
                countdown=round(delay, 2),
            )
            try:
                retry = self.retry(
                    exc=error, countdown=delay, max_retries=policy.max_retries, throw=False
                )
            except Reject as unpublished:  # Celery could not publish the retry: Redis is down
                raise requeue(f"the retry of {self.name}", unpublished.reason) from None
            raise retry from None
        except Exception as error:
            if not _is_control_flow(error):
                log.error(
                    "step_failed",
                    error_class=type(error).__name__,
                    error=str(error),
                    seconds=_since(started),
                )
            raise
        log.info("step_succeeded", seconds=_since(started))
        self.send_next_step(result)
        return result

    def send_next_step(self, result: Any) -> None:
        """Publish the chain's next step now rather than leave it to Celery after we return.

        Celery records a step whose next step it cannot publish as failed, which fails the whole
        operation; here a broker that cannot take it (Redis down for longer than
        `redis_outage_seconds`) sends this step's message back instead, and the step, which finds
        its artifact, runs again.
        """
        request = self.request
        if request.called_directly or not request.chain:
            return
        chain = request.chain
        following = signature(chain[-1], app=self.app)
        with requeued_unless_published(f"the next step {following.task}"):
            following.apply_async(
                (result,),
                chain=chain[:-1],
                parent_id=request.id,
                root_id=request.root_id or request.id,
            )
        request.chain = None  # sent: Celery must not send it again

    def failed_result(self, args: list[Any], kwargs: dict[str, Any], error: BaseException) -> Any:
        """The result this step ends with instead of failing with `error` when it is a part of a
        chord whose body reports every part's outcome (a failed part would fail the body with
        ChordError instead of running it); None, as here: the step fails. Used by
        `FailureAsResult` and by the sweep of abandoned hosts (worker.delivery.hosts)."""
        return None

    @property
    def final_attempt(self) -> bool:
        """Whether this run is the step's last: a transient error now fails it for good."""
        return bool(self.request.retries >= get_settings().retry.max_retries)

    def will_retry(self, error: BaseException) -> bool:
        """Whether this step retries `error` (transient, retries left) instead of failing."""
        return (
            isinstance(error, TransientError)
            and not self.request.called_directly
            and self.request.retries < get_settings().retry.max_retries
        )


def check_arguments(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a call whose arguments do not fit the task's signature, as InvalidRequest.

    Steps are internal, but anyone who can write to the broker can send one, with any
    arguments: Python would raise TypeError for a wrong count, and a value of the wrong JSON
    type (a list where a model's dict belongs, a number for the operation id) would fail
    somewhere inside. Celery's `typing` check runs only in senders that hold the task object.
    Here each argument is checked, strictly, against the step's annotations (the models inside
    are parsed by the step itself)."""
    shape = _call_shapes.get(type(task))
    if shape is None:
        shape = _call_shapes[type(task)] = _call_shape(task.run)
    signature, model = shape
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise InvalidRequest(f"invalid call of {task.name}: {error}") from None
    try:
        model.model_validate(dict(bound.arguments))
    except ValidationError as error:
        raise InvalidRequest(describe_validation(error, f"call of {task.name}")) from None


_call_shapes: dict[type, tuple[inspect.Signature, type[BaseModel]]] = {}


def _call_shape(run: Any) -> tuple[inspect.Signature, type[BaseModel]]:
    """The signature of a task's `run` (bound: without `self`) and a strict model of it."""
    signature = inspect.signature(run)
    hints = typing.get_type_hints(run)
    fields: dict[str, Any] = {
        name: (hints.get(name, Any), ... if p.default is p.empty else p.default)
        for name, p in signature.parameters.items()
    }
    model = create_model(
        f"{getattr(run, '__name__', 'task')}_arguments",
        __config__=ConfigDict(strict=True, arbitrary_types_allowed=True),
        **fields,
    )
    return signature, model


def skip_if_ended_before(task: Task) -> None:
    """Raise Ignore (the message is acknowledged, nothing runs, nothing is stored) when the
    message is a redelivery of a task that already ended (worker.app.redelivery)."""
    ended = ended_before(task)
    if ended is not None:
        log.warning("redelivered_message_skipped", state=ended)
        if getattr(task, "journaled", False) and ended in ("SUCCESS", "FAILURE"):
            # the journal took this run for a start: it shows the step as it ended again
            from worker.app.signals import journal  # the signals' module imports the task bases

            request = task.request
            journal().finished(
                str(request.root_id or request.id),
                request.id,
                task.name,
                ended,  # type: ignore[arg-type]
            )
        raise Ignore()


def _since(started: float) -> float:
    return round(time.monotonic() - started, 4)


def _is_control_flow(error: BaseException) -> bool:
    return isinstance(error, Ignore | Retry)


class FailureAsResult:
    """A step's result backend that stores the failure of a chord's part as the part's
    `failed_result` when it names one (e.g. a precache host's report with every image failed),
    counted in the chord as a success: its body runs with every part's outcome. Every path
    Celery fails a task by goes through `mark_as_failure`: an error raised by the step, its
    pool process lost once its retries are spent, a hard time limit."""

    def __init__(self, backend: Any, task: StepTask) -> None:
        self._backend = backend
        self._task = task

    def mark_as_failure(
        self,
        task_id: str,
        exc: BaseException,
        traceback: Any = None,
        *,
        request: Any = None,
        store_result: bool = True,
        call_errbacks: bool = True,
        state: str = states.FAILURE,
    ) -> None:
        result = None
        if request is not None and request.chord and not request.chain:
            args, kwargs = list(request.args or ()), dict(request.kwargs or {})
            try:
                result = self._task.failed_result(args, kwargs, exc)
            except Exception as problem:  # an unreadable request: the part fails as it would
                log.error("failure_not_reported", error_class=type(problem).__name__)
        if result is None:
            self._backend.mark_as_failure(
                task_id,
                exc,
                traceback=traceback,
                request=request,
                store_result=store_result,
                call_errbacks=call_errbacks,
                state=state,
            )
            return
        log.warning("step_failure_reported", error_class=type(exc).__name__, error=str(exc))
        self._backend.mark_as_done(task_id, result, request=request, store_result=store_result)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)
