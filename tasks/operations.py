"""Entry tasks: the operations a control plane calls, one message and one JSON argument each.

`imgprep.prepare_disk(request)` validates the request, builds its canvas and replaces itself
with it; the canvas's last step carries the caller's task id, so waiting on that id yields the
final result, or the failure with its error class and message.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from tasks.canvases import prepare_disk_steps, with_ids
from tasks.models import PrepareRequest
from worker.app import app
from worker.journal import PlannedStep
from worker.settings import get_settings
from worker.signals import journal
from worker.taskbase import parse


class EntryTask(Task):  # type: ignore[misc]
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


@app.task(name="imgprep.prepare_disk", base=EntryTask, bind=True)
def prepare_disk(self: EntryTask, request: dict[str, Any]) -> Any:
    """Fetch the image into the cache and create the instance disk; result: PreparedDisk."""
    parsed = parse(PrepareRequest, request)
    canvas = with_ids(
        prepare_disk_steps(parsed, host=parsed.host or get_settings().host_id), self.request.id
    )
    plan(self, canvas)
    return self.replace(canvas)
