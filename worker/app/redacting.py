"""A task base that sends every message of its task with redacted JSON argsrepr/kwargsrepr.

Chain steps, retries and `Task.replace` all send through the task type's `apply_async` in the
worker, with the arguments actually sent (a chain step's include its parent's result), so the
representation is computed there. Celery's own `Task.retry` would otherwise fall back to a
Python repr of the raw arguments, signed URLs included.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from domain.core.redaction import message_reprs


class RedactedArguments(Task):  # type: ignore[misc]
    """Base for imgprep tasks: monitors see JSON arguments without secrets."""

    abstract = True

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        options.update(message_reprs(args, kwargs))
        return super().apply_async(args, kwargs, **options)
