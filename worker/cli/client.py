"""The Python client: one task message per operation, by name, with the request as JSON.

This is what a control plane in another language does too (README, "Wire contract"): send
`imgprep.prepare_disk` with one positional argument, the request object, then wait on the id.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.result import AsyncResult

from domain.core.models import PreparedDisk, PrepareRequest
from domain.core.redaction import message_reprs
from worker.app.routing import DEFAULT_QUEUE


class Client:
    """Enqueue operations and read their results."""

    def __init__(self, celery_app: Celery | None = None) -> None:
        if celery_app is None:
            from worker.app import app

            celery_app = app
        self.app: Celery = celery_app

    def prepare_disk(self, request: PrepareRequest) -> AsyncResult:
        """Enqueue imgprep.prepare_disk; the result's id is the operation's id."""
        return self.send("imgprep.prepare_disk", request.model_dump(mode="json"))

    def send(self, task_name: str, payload: dict[str, Any]) -> AsyncResult:
        # argsrepr: what Flower and logs show of the request, URLs without their secrets
        return self.app.send_task(
            task_name, args=[payload], queue=DEFAULT_QUEUE, **message_reprs([payload], None)
        )

    def result(self, task_id: str) -> AsyncResult:
        return self.app.AsyncResult(task_id)

    def wait_prepared(self, result: AsyncResult, timeout: float | None = None) -> PreparedDisk:
        """Block until the operation ends: its PreparedDisk, or its error raised as its class."""
        return PreparedDisk.model_validate(result.get(timeout=timeout, propagate=True))


def prepare_disk(request: PrepareRequest, celery_app: Celery | None = None) -> AsyncResult:
    """Enqueue imgprep.prepare_disk for `request`."""
    return Client(celery_app).prepare_disk(request)
