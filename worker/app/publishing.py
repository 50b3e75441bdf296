"""What a worker does with a message it cannot hand on: it puts its own message back.

Every message a worker publishes (a retry, the next step of a chain, an entry task's canvas)
waits up to `redis_outage_seconds` for Redis (Celery's `task_publish_retry_policy`, see
worker.app). When Redis is still down after that, the work must not be lost: the task raises
`Reject(requeue=True)` instead of failing, so its own message goes back to the queue (or, when
Redis cannot even take that, stays among the unacknowledged messages that a worker restores
after `visibility_timeout`), and the task, idempotent like every step, runs again. Celery's own
`Task.retry` rejects the message *without* requeue when it cannot publish the retry, which
drops the request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

log = structlog.get_logger(__name__)


@contextmanager
def requeued_unless_published(what: str) -> Iterator[None]:
    """Publish inside this block; a broker that cannot take `what` requeues this task."""
    try:
        yield
    except OperationalError as error:
        raise requeue(what, error) from None


def requeue(what: str, error: BaseException) -> Reject:
    """The Reject that sends this task's message back, logged with what could not be sent."""
    log.error("message_not_published", message=what, error=str(error), requeued=True)
    return Reject(f"{what} could not be published ({error}); this message goes back", requeue=True)
