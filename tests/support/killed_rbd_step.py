"""One rbd step's domain functions in a process of its own, which kills its whole process group
(itself and the tool it runs, as a host that dies) at the point named on its command line:

    python -m tests.support.killed_rbd_step import|clone KILL_AFTER REQUEST_JSON

KILL_AFTER: after the tool call whose command line contains it returns, or, for "convert",
once a qemu-img convert has reported 10 %. Settings come from the environment, as a worker's.
Exits 3 if it was never killed."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from domain.core.models import PrepareRequest
from domain.core.runner import CommandResult, Runner
from domain.formats.qemu_img import PROGRESS
from domain.rbd import clones, images
from domain.rbd.tool import RbdTool
from worker.app.runtime import build_runtime
from worker.settings import Settings


def die() -> None:
    os.killpg(0, signal.SIGKILL)


@dataclasses.dataclass
class KillingRunner(Runner):
    kill_after: str = ""

    def run(self, argv: Sequence[str], **options: Any) -> CommandResult:
        result = super().run(argv, **options)
        if self.kill_after in " ".join(argv):
            die()
        return result

    def stream(
        self, argv: Sequence[str], *, on_line: Callable[[str], None], **options: Any
    ) -> CommandResult:
        def line(text: str) -> None:
            on_line(text)
            percent = PROGRESS.search(text)
            if self.kill_after == "convert" and percent and float(percent.group(1)) > 10:
                die()

        return super().stream(argv, on_line=line, **options)


def main(step: str, kill_after: str, request_json: str) -> int:
    request = PrepareRequest.model_validate_json(request_json)
    context = build_runtime(Settings()).rbd
    runner = KillingRunner(default_timeout=600, kill_after=kill_after)
    context = dataclasses.replace(context, tool=RbdTool(context.tool.access, runner))
    base = images.import_to_rbd(request.image, context)
    if step == "clone":
        clones.clone_rbd_disk(request, base, context, "rbd-a")
    print("finished without being killed", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
