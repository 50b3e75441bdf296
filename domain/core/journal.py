"""The step journal's records: which steps a canvas has, and what became of each.

A journal (domain.core.ports.StepJournal; worker.redis_journal keeps it in Redis) is written by
the runtime as steps start, retry and end, and read by `imgprep status` and the demo to show a
canvas as a tree of steps with durations. The result backend stays the authority on each step's
state.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

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
