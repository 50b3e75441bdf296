"""imgprep.convert: one qemu-img convert, with progress as the task's PROGRESS state.

The job comes from the broker: it runs only as a snapshot's conversion (domain.formats.snapshot.
confirm_job: an instance disk in its recorded format, to a target under the snapshots
directory)."""

from __future__ import annotations

from typing import Any

from domain.core.snapshot_models import ConvertJob
from domain.formats.conversion import convert_image
from domain.formats.snapshot import confirm_job
from worker.app import app
from worker.progress import TaskProgress
from worker.runtime import runtime
from worker.taskbase import StepTask, parse


@app.task(name="imgprep.convert", base=StepTask, bind=True)
def convert(self: StepTask, job: dict[str, Any]) -> dict[str, Any]:
    settings = runtime().settings
    confirmed = confirm_job(
        parse(ConvertJob, job, "convert job"),
        instances_dir=settings.instances_dir,
        snapshots_dir=settings.snapshots_dir,
    )
    converted = convert_image(
        confirmed,
        source_roots=(settings.instances_dir,),
        target_roots=(settings.snapshots_dir,),
        runner=runtime().runner,
        locks=runtime().locks,
        limits=runtime().qemu_limits,
        progress=TaskProgress(self, "convert"),
    )
    return converted.model_dump(mode="json")
