"""The state of an operation: its final result or error, and each step of its canvas.

The result backend is the authority on states; the journal adds which steps ran, for how long,
on which worker and how many times. A step that never started after an earlier one failed is
reported as SKIPPED, although the backend marks it failed too (Celery fails the rest of a chain).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from pydantic import BaseModel, ConfigDict

from domain.core.journal import StepJournal


class StepStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    task_id: str
    state: str
    seconds: float | None = None
    attempts: int = 0
    worker: str | None = None
    error: str | None = None
    progress: dict[str, Any] | None = None


class OperationStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    state: str
    error_type: str | None = None
    error: str | None = None
    result: Any = None
    steps: list[StepStatus] = []

    @property
    def ready(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE", "REVOKED")


def error_parts(value: object) -> tuple[str | None, str | None]:
    if isinstance(value, BaseException):
        return type(value).__name__, str(value)
    return None, None


def read_status(app: Celery, journal: StepJournal, task_id: str) -> OperationStatus:
    """Everything known about operation `task_id`."""
    final = app.AsyncResult(task_id)
    state = final.state
    result = final.result if state == "SUCCESS" else None
    error_type, error = error_parts(final.result) if state == "FAILURE" else (None, None)
    steps = []
    view = journal.read(task_id)
    if view is not None:
        for planned in view.plan:
            record = view.records.get(planned.task_id)
            step_result = app.AsyncResult(planned.task_id)
            step_state = step_result.state
            progress = (
                step_result.info
                if step_state == "PROGRESS" and isinstance(step_result.info, dict)
                else None
            )
            if record is None and step_state == "FAILURE":
                step_state = "SKIPPED"
            elif record is not None and step_state == "PENDING":
                step_state = record.state  # running, or retrying: the journal knows first
            elif record is not None and record.state == "FAILURE" and step_state == "SUCCESS":
                step_state = "FAILURE"  # a failure the step reported as its result (a chord's)
            steps.append(
                StepStatus(
                    name=planned.name.removeprefix("imgprep."),
                    task_id=planned.task_id,
                    state=step_state,
                    seconds=record.seconds if record else None,
                    attempts=record.attempts if record else 0,
                    worker=record.worker if record else None,
                    error=record.error if record else None,
                    progress=progress,
                )
            )
    if view is not None and state == "PENDING" and any(s.state != "PENDING" for s in steps):
        state = "STARTED"
    return OperationStatus(
        task_id=task_id, state=state, error_type=error_type, error=error, result=result, steps=steps
    )
