"""The step journal: which steps a canvas has, and when each started, ended, retried or failed.

Kept in Redis under `imgprep:journal:<root task id>` (the id the caller holds) for as long as
results are kept. `imgprep status` and the demo read it to show the canvas as a tree of steps
with durations; the result backend stays the authority on each step's state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError

from domain.core.journal import CanvasView, PlannedStep, StepRecord, StepState
from worker.stores.replies import text

log = structlog.get_logger(__name__)

JOURNAL_PREFIX = "imgprep:journal:"
PLAN_FIELD = "plan"
# Each step's attributes are fields `<task id>#<attribute>` of the journal hash, so that every
# event is one round trip with no read before it; counters are incremented atomically (HINCRBY),
# so concurrent runs of the same step (a re-delivered message) are each counted.
SEPARATOR = "#"
ATTEMPTS = "attempts"
FINISHES = "finishes"


class RedisJournal:
    """The StepJournal in Redis. Writes never fail a task: a journal that Redis could not take is
    only logged."""

    def __init__(self, client: Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds

    def key(self, root_id: str) -> str:
        return JOURNAL_PREFIX + root_id

    def plan(
        self,
        root_id: str,
        steps: list[PlannedStep],
        *,
        done: Sequence[PlannedStep] = (),
        worker: str = "",
    ) -> None:
        """The canvas's steps, in order. `done`: steps of the plan the entry task found already
        done (a cache hit), recorded as succeeded in the same round trip."""
        fields: dict[Any, Any] = {
            PLAN_FIELD: "[" + ",".join(step.model_dump_json() for step in steps) + "]"
        }
        now = repr(time.time())
        for step in done:
            values = {
                "name": step.name,
                "state": "SUCCESS",
                "worker": worker,
                "error": "",
                "started_at": now,
                "finished_at": now,
                ATTEMPTS: "1",
                FINISHES: "1",
            }
            fields.update({step.task_id + SEPARATOR + k: v for k, v in values.items()})
        try:
            pipe = self.client.pipeline()
            pipe.hset(self.key(root_id), mapping=fields)
            pipe.expire(self.key(root_id), self.ttl)
            pipe.execute()
        except RedisError as error:
            log.warning("journal_write_failed", root_id=root_id, error=str(error))

    def started(self, root_id: str, task_id: str, name: str, worker: str) -> None:
        self._write(
            root_id,
            task_id,
            {"name": name, "state": "STARTED", "worker": worker, "error": ""},
            first={"started_at": repr(time.time())},
            count=ATTEMPTS,
        )

    def finished(
        self, root_id: str, task_id: str, name: str, state: StepState, error: str | None = None
    ) -> None:
        final = state in ("SUCCESS", "FAILURE")
        fields = {"name": name, "state": state, "error": error or ""}
        if final:
            fields["finished_at"] = repr(time.time())
        self._write(root_id, task_id, fields, count=FINISHES if final else None)

    def read(self, root_id: str) -> CanvasView | None:
        raw = self.client.hgetall(self.key(root_id))
        if not raw:
            return None
        fields = {text(k): text(v) for k, v in raw.items()}
        plan_text = fields.pop(PLAN_FIELD, "[]")
        plan = [PlannedStep.model_validate(item) for item in _json_list(plan_text)]
        by_task: dict[str, dict[str, str]] = {}
        for name, value in fields.items():
            task_id, _, attribute = name.partition(SEPARATOR)
            by_task.setdefault(task_id, {})[attribute] = value
        records = {task_id: _record(task_id, values) for task_id, values in by_task.items()}
        return CanvasView(root_id=root_id, plan=plan, records=records)

    def _write(
        self,
        root_id: str,
        task_id: str,
        values: dict[str, str],
        *,
        first: dict[str, str] | None = None,
        count: str | None = None,
    ) -> None:
        """One round trip: set `values`, set `first` only if unset, increment `count`."""
        key = self.key(root_id)
        try:
            pipe = self.client.pipeline()
            pipe.hset(key, mapping={task_id + SEPARATOR + k: v for k, v in values.items()})
            for attribute, value in (first or {}).items():
                pipe.hsetnx(key, task_id + SEPARATOR + attribute, value)
            if count is not None:
                pipe.hincrby(key, task_id + SEPARATOR + count, 1)
            pipe.expire(key, self.ttl)
            pipe.execute()
        except RedisError as error:
            log.warning("journal_write_failed", root_id=root_id, error=str(error))


def _record(task_id: str, values: dict[str, str]) -> StepRecord:
    def number(attribute: str) -> float | None:
        return float(values[attribute]) if values.get(attribute) else None

    return StepRecord(
        task_id=task_id,
        name=values.get("name", ""),
        state=values.get("state", "PENDING"),
        worker=values.get("worker") or None,
        started_at=number("started_at"),
        finished_at=number("finished_at"),
        attempts=int(values.get(ATTEMPTS, 0)),
        finishes=int(values.get(FINISHES, 0)),
        error=values.get("error") or None,
    )


def _json_list(text: str) -> list[object]:
    value = json.loads(text)
    return value if isinstance(value, list) else []
