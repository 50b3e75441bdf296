"""imgprep.convert: one qemu-img convert, with progress as the task's PROGRESS state.

The job comes from the broker: it runs only as a snapshot's conversion (domain.formats.snapshot.
convert: an instance disk in its recorded format, to a target under the snapshots directory)."""

from __future__ import annotations

from typing import Any

from domain.formats import snapshot
from domain.formats.snapshot_models import ConvertJob
from worker.app import app
from worker.app.progress import TaskProgress
from worker.app.runtime import runtime
from worker.app.taskbase import StepTask, parse


@app.task(name="imgprep.convert", base=StepTask, bind=True)
def convert(self: StepTask, job: dict[str, Any]) -> dict[str, Any]:
    current = runtime()
    converted = snapshot.convert(
        parse(ConvertJob, job, "convert job"),
        instances_dir=current.settings.instances_dir,
        snapshots_dir=current.settings.snapshots_dir,
        runner=current.runner,
        locks=current.locks,
        limits=current.qemu_limits,
        progress=TaskProgress(self, "convert"),
    )
    return converted.model_dump(mode="json")
