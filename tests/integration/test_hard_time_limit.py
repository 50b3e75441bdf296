"""A step killed at its hard time limit ends, for its caller, with the typed StepTimedOut.

Celery's worker kills the pool process and stores billiard's TimeLimitExceeded from its main
process (celery.worker.request.Request.on_timeout: backend.mark_as_failure); imgprep's result
backend stores StepTimedOut instead, in a real Redis, read back as a client reads it."""

from __future__ import annotations

import uuid

import pytest
from celery import Celery
from celery.exceptions import TimeLimitExceeded
from celery.result import AsyncResult
from celery.utils.objects import Bunch

from domain.core.errors import StepTimedOut
from harness.redis_server import RedisServer
from worker.app.results import ERRORS_WIRE_MODULE, RedactingRedisBackend


def test_a_step_killed_at_its_hard_limit_fails_with_step_timed_out(
    redis_server: RedisServer,
) -> None:
    # Given imgprep's result backend on a real Redis
    app = Celery(set_as_current=False)
    backend = RedactingRedisBackend(app=app, url=redis_server.url)
    task_id = str(uuid.uuid4())
    request = Bunch(
        id=task_id,
        task="imgprep.copy_raw_disk",
        errbacks=None,
        chord=None,
        group=None,
        ignore_result=False,
        delivery_info={},
        parent_id=None,
        root_id=None,
    )

    # When the worker's main process records the kill, as Celery does at the hard limit
    backend.mark_as_failure(task_id, TimeLimitExceeded(75), request=request)

    # Then the stored failure is imgprep's StepTimedOut under the wire module, naming the step
    # and the limit, and a client waiting on the id gets that class
    stored = backend.get_task_meta(task_id)
    assert stored["status"] == "FAILURE"
    with pytest.raises(
        StepTimedOut, match=r"imgprep\.copy_raw_disk ran past its hard time limit \(75 s\)"
    ):
        AsyncResult(task_id, backend=backend, app=app).get(timeout=10, propagate=True)
    raw = backend.client.get(backend.get_key_for_task(task_id))
    assert f'"exc_module": "{ERRORS_WIRE_MODULE}"' in raw.decode()
    assert '"exc_type": "StepTimedOut"' in raw.decode()
    backend.client.delete(backend.get_key_for_task(task_id))
