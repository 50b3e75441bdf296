"""The result backend: Celery's Redis backend, storing nothing that carries credentials.

With `result_extended` Celery stores each task's arguments beside its result, and a failure's
traceback beside its error, in `celery-task-meta-<id>` for `result_expires` (a day by default).
An image URL may carry user info or a signed query string; this backend stores the arguments
with every URL redacted (tasks.redaction), and URLs inside error messages and tracebacks too. The
raw URL lives only in the task messages, for as long as the operation runs. What a client reads
keeps its shape: the stored record is Celery's, field for field.

`celery_config` selects it for `redis://` and `rediss://` result backends (`override_backends`).
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend

from tasks.redaction import redacted, redacted_text

BACKEND = "worker.results:RedactingRedisBackend"
ERROR_STATES = frozenset({"FAILURE", "RETRY"})


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


class RedactingRedisBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend; every record it writes goes through `stored_form`."""

    def _get_result_meta(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # The key-value backends (Redis among them) call this without `encode`: the arguments
        # are still Python values here, and the whole record is encoded once afterwards.
        return stored_form(super()._get_result_meta(*args, **kwargs))
