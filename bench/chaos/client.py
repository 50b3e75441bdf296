"""The campaign's client: what a control plane in any language does (README, "The wire contract").

It sends each operation as one task message, by name, with the request as JSON, from a plain
Celery app that imports nothing of imgprep and has no result backend; it reads outcomes straight
from `celery-task-meta-<id>` in Redis. A send that fails (Redis down) is tried again with the
same task id until the operation's deadline, as a patient control plane would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.sentinel
from celery import Celery

META_PREFIX = "celery-task-meta-"
FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")


@dataclass(frozen=True)
class Outcome:
    """A final state read from the result backend."""

    state: str
    result: dict[str, Any] | None = None
    error_class: str | None = None
    error_module: str | None = None
    error_message: str | None = None


class PlainClient:
    def __init__(self, redis_url: str, master_name: str | None = None) -> None:
        """`redis_url` is one server, or Sentinels (`sentinel://h:p;sentinel://h:p/0`) that know
        the master as `master_name` (kombu's Sentinel transport; redis-py's `master_for`)."""
        self.app = Celery("chaos-client", broker=redis_url, set_as_current=False)
        self.app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
            broker_transport_options={"master_name": master_name} if master_name else {},
        )
        options: dict[str, Any] = {
            "socket_timeout": 3,
            "socket_connect_timeout": 1,
            "health_check_interval": 5,
        }
        if master_name:
            parts = [urlsplit(part) for part in redis_url.split(";")]
            sentinels = redis.sentinel.Sentinel(
                [(p.hostname, p.port or 26379) for p in parts if p.hostname],
                sentinel_kwargs={"socket_timeout": 3, "socket_connect_timeout": 1},
                db=int(parts[-1].path.strip("/") or 0),
                **options,
            )
            self.redis = sentinels.master_for(master_name)
        else:
            self.redis = redis.Redis.from_url(redis_url, **options)

    def send(self, task: str, payload: dict[str, Any], task_id: str, queue: str) -> None:
        """Publish one message; raises when the broker cannot take it now."""
        self.app.send_task(
            task,
            args=[payload],
            task_id=task_id,
            queue=queue,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )

    def outcomes(self, task_ids: list[str]) -> dict[str, Outcome]:
        """The final outcomes among `task_ids` (pending ones are left out); raises RedisError
        while Redis is down."""
        if not task_ids:
            return {}
        raws = self.redis.mget([META_PREFIX + task_id for task_id in task_ids])
        found = {}
        for task_id, raw in zip(task_ids, raws, strict=True):
            if raw is None:
                continue
            outcome = parse_meta(json.loads(raw))
            if outcome is not None:
                found[task_id] = outcome
        return found

    def close(self) -> None:
        self.redis.close()
        self.app.close()


def parse_meta(meta: dict[str, Any]) -> Outcome | None:
    """The outcome stored by Celery, or None while the operation runs (PROGRESS, RETRY, ...)."""
    state = str(meta.get("status"))
    if state not in FINAL_STATES:
        return None
    result = meta.get("result")
    if state == "SUCCESS":
        return Outcome(state, result=result if isinstance(result, dict) else {"value": result})
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(part) for part in message)
        return Outcome(
            state,
            error_class=str(result["exc_type"]),
            error_module=str(result.get("exc_module")),
            error_message=str(message),
        )
    return Outcome(state, error_class=state, error_message=json.dumps(result)[:500])
