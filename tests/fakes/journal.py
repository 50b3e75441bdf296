"""An in-memory step journal (the StepJournal port)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from domain.core.journal import CanvasView, PlannedStep, StepRecord, StepState


class InMemoryJournal:
    def __init__(self) -> None:
        self.plans: dict[str, list[PlannedStep]] = {}
        self.records: dict[str, dict[str, StepRecord]] = {}

    def plan(
        self,
        root_id: str,
        steps: list[PlannedStep],
        *,
        done: Sequence[PlannedStep] = (),
        worker: str = "",
    ) -> None:
        self.plans[root_id] = list(steps)
        now = time.time()
        for step in done:
            self.records.setdefault(root_id, {})[step.task_id] = StepRecord(
                task_id=step.task_id,
                name=step.name,
                state="SUCCESS",
                worker=worker,
                started_at=now,
                finished_at=now,
                attempts=1,
                finishes=1,
            )

    def started(self, root_id: str, task_id: str, name: str, worker: str) -> None:
        record = self._record(root_id, task_id, name)
        self._put(
            root_id,
            record.model_copy(
                update={
                    "state": "STARTED",
                    "worker": worker,
                    "error": None,
                    "started_at": record.started_at or time.time(),
                    "attempts": record.attempts + 1,
                }
            ),
        )

    def finished(
        self, root_id: str, task_id: str, name: str, state: StepState, error: str | None = None
    ) -> None:
        record = self._record(root_id, task_id, name)
        final = state in ("SUCCESS", "FAILURE")
        update: dict[str, object] = {"state": state, "error": error}
        if final:
            update |= {"finished_at": time.time(), "finishes": record.finishes + 1}
        self._put(root_id, record.model_copy(update=update))

    def read(self, root_id: str) -> CanvasView | None:
        if root_id not in self.plans and root_id not in self.records:
            return None
        return CanvasView(
            root_id=root_id,
            plan=self.plans.get(root_id, []),
            records=dict(self.records.get(root_id, {})),
        )

    def _record(self, root_id: str, task_id: str, name: str) -> StepRecord:
        return self.records.get(root_id, {}).get(task_id) or StepRecord(
            task_id=task_id, name=name, state="PENDING"
        )

    def _put(self, root_id: str, record: StepRecord) -> None:
        self.records.setdefault(root_id, {})[record.task_id] = record
