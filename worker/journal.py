"""The step journal: which steps a canvas has, and when each started, ended, retried or failed.

Kept in Redis under `imgprep:journal:<root task id>` (the id the caller holds) for as long as
results are kept. `imgprep status` and the demo read it to show the canvas as a tree of steps
with durations; the result backend stays the authority on each step's state.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict
from redis import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

JOURNAL_PREFIX = "imgprep:journal:"
PLAN_FIELD = "plan"
# Counters kept beside each step's record, incremented atomically (HINCRBY): concurrent runs of
# the same step (a re-delivered message) are each counted.
ATTEMPTS = "#attempts"
FINISHES = "#finishes"

StepState = Literal["PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE"]


class PlannedStep(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    task_id: str
    queue: str | None = None


class StepRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    name: str
    state: StepState
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # times the step started (retries and re-deliveries included)
    finishes: int = 0  # times it ended in SUCCESS or FAILURE
    error: str | None = None

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


class CanvasView(BaseModel):
    model_config = ConfigDict(frozen=True)

    root_id: str
    plan: list[PlannedStep]
    records: dict[str, StepRecord]


class Journal:
    """Writes never fail a task: a journal that Redis could not take is only logged."""

    def __init__(self, client: Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds

    def key(self, root_id: str) -> str:
        return JOURNAL_PREFIX + root_id

    def plan(self, root_id: str, steps: list[PlannedStep]) -> None:
        body = "[" + ",".join(step.model_dump_json() for step in steps) + "]"
        self._write(root_id, PLAN_FIELD, body)

    def started(self, root_id: str, task_id: str, name: str, worker: str) -> None:
        previous = self._record(root_id, task_id)
        record = StepRecord(
            task_id=task_id,
            name=name,
            state="STARTED",
            worker=worker,
            started_at=previous.started_at if previous and previous.started_at else time.time(),
        )
        self._write(root_id, task_id, record.model_dump_json(), count=ATTEMPTS)

    def finished(
        self, root_id: str, task_id: str, name: str, state: StepState, error: str | None = None
    ) -> None:
        previous = self._record(root_id, task_id)
        final = state in ("SUCCESS", "FAILURE")
        record = StepRecord(
            task_id=task_id,
            name=name,
            state=state,
            worker=previous.worker if previous else None,
            started_at=previous.started_at if previous else None,
            finished_at=time.time() if final else None,
            error=error,
        )
        self._write(root_id, task_id, record.model_dump_json(), count=FINISHES if final else None)

    def read(self, root_id: str) -> CanvasView | None:
        raw = self.client.hgetall(self.key(root_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        plan_text = fields.pop(PLAN_FIELD, "[]")
        plan = [PlannedStep.model_validate(item) for item in _json_list(plan_text)]
        counts = {name: int(value) for name, value in fields.items() if "#" in name}
        records = {
            tid: StepRecord.model_validate_json(text).model_copy(
                update={
                    "attempts": counts.get(tid + ATTEMPTS, 0),
                    "finishes": counts.get(tid + FINISHES, 0),
                }
            )
            for tid, text in fields.items()
            if "#" not in tid
        }
        return CanvasView(root_id=root_id, plan=plan, records=records)

    def _record(self, root_id: str, task_id: str) -> StepRecord | None:
        try:
            raw = self.client.hget(self.key(root_id), task_id)
        except RedisError:
            return None
        return StepRecord.model_validate_json(raw) if raw else None

    def _write(self, root_id: str, field: str, value: str, count: str | None = None) -> None:
        try:
            pipe = self.client.pipeline()
            pipe.hset(self.key(root_id), field, value)
            if count is not None:
                pipe.hincrby(self.key(root_id), field + count, 1)
            pipe.expire(self.key(root_id), self.ttl)
            pipe.execute()
        except RedisError as error:
            log.warning("journal_write_failed", root_id=root_id, error=str(error))


def _json_list(text: str) -> list[object]:
    value = json.loads(text)
    return value if isinstance(value, list) else []


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
