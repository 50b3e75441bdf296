"""The step journal's records: which steps a canvas has, and what became of each.

A journal (`StepJournal`; worker.stores.redis_journal keeps it in Redis) is written by
the runtime as steps start, retry and end, and read by `imgprep status` and the demo to show a
canvas as a tree of steps with durations. The result backend stays the authority on each step's
state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

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


class StepJournal(Protocol):
    """Which steps a canvas has, and when each started, ended, retried or failed; keyed by the
    canvas's root task id (the id the caller holds). Writes never fail a step."""

    def plan(
        self,
        root_id: str,
        steps: list[PlannedStep],
        *,
        done: Sequence[PlannedStep] = (),
        worker: str = "",
    ) -> None:
        """The canvas's steps, in order; `done`: steps found already done (recorded as
        succeeded)."""
        ...

    def started(self, root_id: str, task_id: str, name: str, worker: str) -> None: ...

    def finished(
        self, root_id: str, task_id: str, name: str, state: StepState, error: str | None = None
    ) -> None: ...

    def read(self, root_id: str) -> CanvasView | None: ...
