"""The base of entry tasks, and the journal plan they record before replacing themselves."""

from __future__ import annotations

from typing import Any

from celery import Task

from worker.journal import PlannedStep
from worker.redacting import RedactedArguments
from worker.signals import journal


class EntryTask(RedactedArguments):
    """An operation's entry point: builds a canvas, never retried itself."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    typing = True


def plan(task: Task, canvas: Any) -> None:
    root_id = str(task.request.root_id or task.request.id)
    journal().plan(
        root_id,
        [
            PlannedStep(
                name=step.task, task_id=step.options["task_id"], queue=step.options.get("queue")
            )
            for step in canvas.tasks
        ],
    )
