"""imgprep.precache: images into the caches of hosts before instances ask for them (Nova's
aggregate image pre-cache).

Validates the request, takes its hosts (or every live host), and hands its task id over to a
canvas: imgprep.precache_host on each host's queue at once (each reports PROGRESS), then
imgprep.precache_report, which carries the caller's task id and returns one PrecacheReport:
an outcome per host and image. A host without live workers is reported failed
(HostUnavailable) for each image, without anything sent to it.
"""

from __future__ import annotations

from typing import Any

from domain.cache.precache import host_failed, precache_report
from domain.cache.precache_models import PrecacheReport, PrecacheRequest
from domain.core.errors import HostUnavailable
from domain.core.journal import PlannedStep
from domain.core.models import ImageSource
from tasks.canvases import precache_steps
from worker.app import app
from worker.app.entry import CanvasEntryTask, hand_over
from worker.app.runtime import runtime
from worker.app.signals import journal
from worker.app.taskbase import parse
from worker.delivery.hosts import live_hosts, unavailable_hosts


@app.task(name="imgprep.precache", base=CanvasEntryTask, bind=True)
def precache(self: CanvasEntryTask, request: dict[str, Any]) -> None:
    """Fetch the images into the caches of the hosts; result: PrecacheReport."""
    parsed = parse(PrecacheRequest, request)
    current = runtime()
    live = {*live_hosts(current.settings, current.redis), current.settings.host_id}
    wanted = list(dict.fromkeys(parsed.hosts or sorted(live)))
    down = unavailable_hosts(wanted, current.settings, current.redis)
    hosts = [host for host in wanted if host not in down]
    refused = _refused(down, parsed.images)
    canvas, steps = precache_steps(parsed.images, hosts, refused=refused, final_id=self.request.id)
    journal().plan(
        self.request.id,
        [
            PlannedStep(
                name=_step_name(step.task, step.args),
                task_id=step.options["task_id"],
                queue=step.options.get("queue"),
            )
            for step in steps
        ],
        worker=self.request.hostname or "",
    )
    hand_over(self, canvas)


def _step_name(task: str, args: Any) -> str:
    """`imgprep.precache_host@<host>`, so each host's step shows as its own line."""
    if task == "imgprep.precache_host":
        return f"{task}@{args[0]['host']}"
    return str(task)


def _refused(down: dict[str, str], images: tuple[ImageSource, ...]) -> PrecacheReport:
    """The report of the hosts no live worker serves, each with why: nothing is sent to them."""
    return precache_report(
        [
            host_failed(host, images, HostUnavailable(f"{why}; nothing was sent to it"))
            for host, why in down.items()
        ]
    )
