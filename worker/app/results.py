"""The result backend: Celery's Redis backend, storing nothing that carries credentials.

With `result_extended` Celery stores each task's arguments beside its result, and a failure's
traceback beside its error, in `celery-task-meta-<id>` for `result_expires` (a day by default).
An image URL may carry user info or a signed query string; this backend stores the arguments
with every URL redacted (domain.core.redaction), and URLs inside error messages and tracebacks
too. The raw URL lives only in the task messages, for as long as the operation runs. What a
client reads keeps its shape: the stored record is Celery's, field for field.

Errors keep the module name they have on the wire, `tasks.errors` (`exc_module` in every stored
failure, README "Wire contract"), although imgprep defines them in domain.core.errors: this
backend writes that name and reads it back as domain.core.errors (and tasks.errors, an alias
of domain.core.errors, serves Python clients that use Celery's own backend).

`celery_config` selects it for `redis://` and `rediss://` result backends, and its Sentinel
variant (Celery's SentinelBackend: the master found through the Sentinels, again after a
failover) for `sentinel://` ones (`override_backends`).
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import TimeLimitExceeded

from domain.core import errors
from domain.core.redaction import redacted, redacted_text

BACKEND = "worker.app.results:RedactingRedisBackend"
SENTINEL_BACKEND = "worker.app.results:RedactingSentinelBackend"
ERROR_STATES = frozenset({"FAILURE", "RETRY"})
# The module imgprep's errors are published under (`exc_module`), and where they are defined.
ERRORS_WIRE_MODULE = "tasks.errors"


def stored_form(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` as it may be stored: arguments with URLs redacted, error texts without URLs."""
    safe = dict(meta)
    for field in ("args", "kwargs"):
        if safe.get(field) is not None:
            safe[field] = redacted(safe[field])
    if isinstance(safe.get("traceback"), str):
        safe["traceback"] = redacted_text(safe["traceback"])
    result = safe.get("result")
    if safe.get("status") in ERROR_STATES and isinstance(result, dict):
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            result = {
                **result,
                "exc_message": [
                    redacted_text(part) if isinstance(part, str) else part for part in message
                ],
            }
        elif isinstance(message, str):
            result = {**result, "exc_message": redacted_text(message)}
        safe["result"] = result
    return safe


class Redacting:
    """What imgprep's result backends store and read back: every record through `stored_form`,
    errors under their wire module."""

    def _get_result_meta(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # The key-value backends (Redis among them) call this without `encode`: the arguments
        # are still Python values here, and the whole record is encoded once afterwards.
        return stored_form(super()._get_result_meta(*args, **kwargs))  # type: ignore[misc]

    def prepare_exception(self, exc: BaseException, serializer: Any = None) -> Any:
        prepared = super().prepare_exception(exc, serializer)  # type: ignore[misc]
        if isinstance(prepared, dict) and prepared.get("exc_module") == errors.__name__:
            prepared["exc_module"] = ERRORS_WIRE_MODULE
        return prepared

    def mark_as_failure(self, task_id: str, exc: BaseException, *args: Any, **kwargs: Any) -> Any:
        """A step killed at its hard time limit fails, for its caller, with the typed
        StepTimedOut like one stopped at the soft limit, not with billiard's TimeLimitExceeded
        (Celery's worker stores that one from its main process after killing the pool process:
        the step could not clean up, its release errback and the janitor do)."""
        if isinstance(exc, TimeLimitExceeded):
            name = getattr(kwargs.get("request"), "task", None) or "a step"
            limit = f" ({exc.args[0]} s)" if exc.args else ""
            exc = errors.StepTimedOut(
                f"{name} ran past its hard time limit{limit} and was killed before it finished "
                "cleaning up (what it held is released by its errback and the janitor); a step "
                "this long needs a larger IMGPREP_STEP_TIME_LIMIT (and IMGPREP_VISIBILITY_TIMEOUT)"
            )
        return super().mark_as_failure(task_id, exc, *args, **kwargs)  # type: ignore[misc]

    def exception_to_python(self, exc: Any) -> Any:
        if isinstance(exc, dict) and exc.get("exc_module") == ERRORS_WIRE_MODULE:
            exc = {**exc, "exc_module": errors.__name__}
        return super().exception_to_python(exc)  # type: ignore[misc]


class RedactingRedisBackend(Redacting, RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend; every record it writes goes through `stored_form`."""


class RedactingSentinelBackend(Redacting, SentinelBackend):  # type: ignore[misc]
    """Celery's Redis Sentinel result backend, redacting as `RedactingRedisBackend` does."""
