"""A message delivered again after its task ended does not run the task again.

Steps acknowledge late: a worker killed after a step ended but before its acknowledgement
reached Redis (or an acknowledgement lost in a Redis restart) leaves the message to be put back
on its queue, and it is delivered again, marked `redelivered`. Steps are idempotent while their
operation runs, but not once it has ended and the control plane moved on: a create_overlay
delivered again after the disk was deleted would create the disk again, and a last step
delivered again would overwrite the operation's stored result.

So a redelivered message whose task id already has a final state in the result backend is
skipped (acknowledged, nothing run, the stored result left as it is). The step had sent the
next step of its chain before its result was stored (`StepTask.send_next_step`; Celery applies
callbacks before storing too), so the operation has already gone on. A message delivered for
the first time is not checked: it costs a Redis read only when a message comes back.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import states
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)


def ended_before(task: Any) -> str | None:
    """The final state (SUCCESS, FAILURE, REVOKED) stored for the task's id when its message is
    a redelivery; None for a first delivery, a task still running or retrying, or when the
    result backend cannot be read (then the task runs, as idempotent steps may)."""
    request = task.request
    if request.called_directly or not (request.delivery_info or {}).get("redelivered"):
        return None
    try:
        state = str(task.app.backend.get_state(request.id))
    except (RedisError, OSError) as error:
        log.warning("redelivery_not_checked", error=str(error))
        return None
    return state if state in states.READY_STATES else None
