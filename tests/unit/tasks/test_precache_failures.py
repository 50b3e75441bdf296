"""A precache host step that fails as a part of its precache (a chord) ends with its host's
report, every image failed with the error, so the chord's body still runs and reports every host;
sent on its own, it fails as any step."""

from __future__ import annotations

from typing import Any

from billiard.exceptions import WorkerLostError
from celery.app.task import Context

from domain.cache.precache_models import PrecacheReport
from tasks.steps.precache_host import precache_host

IMAGES = [
    {"url": "http://127.0.0.1:1/a.raw", "image_id": "img-a"},
    {"url": "http://127.0.0.1:1/b.raw", "image_id": "img-b"},
]
BODY = {
    "task": "imgprep.precache_report",
    "options": {"task_id": "caller"},
    "args": [],
    "kwargs": {},
}


class Recorded:
    """A result backend that records what it was asked to store."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def mark_as_done(self, task_id: str, result: Any, **kwargs: Any) -> None:
        self.calls.append(("done", result))

    def mark_as_failure(self, task_id: str, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("failure", exc))


def request(**extra: Any) -> Context:
    return Context(
        id="step", args=[{"images": IMAGES, "host": "h4"}], kwargs={}, chain=None, **extra
    )


def backend_of_step() -> tuple[Any, Recorded]:
    recorded = Recorded()
    backend = precache_host.backend
    backend._backend = recorded  # the wrapper around a backend that records
    return backend, recorded


def test_a_chord_part_that_lost_its_worker_ends_with_its_host_failed() -> None:
    backend, recorded = backend_of_step()
    lost = WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 3.")
    backend.mark_as_failure("step", lost, request=request(group="g", chord=BODY))

    [(kind, result)] = recorded.calls
    assert kind == "done"
    report = PrecacheReport.model_validate(result)
    assert [(r.host, r.image_id, r.outcome, r.error_class) for r in report.results] == [
        ("h4", "img-a", "failed", "WorkerLostError"),
        ("h4", "img-b", "failed", "WorkerLostError"),
    ]
    assert "SIGKILL" in (report.results[0].error_message or "")


def test_a_step_sent_on_its_own_fails_as_any_step() -> None:
    backend, recorded = backend_of_step()
    lost = WorkerLostError("Worker exited prematurely")
    backend.mark_as_failure("step", lost, request=request())
    assert recorded.calls == [("failure", lost)]


def test_an_unreadable_request_fails_with_its_error() -> None:
    backend, recorded = backend_of_step()
    lost = WorkerLostError("Worker exited prematurely")
    broken = Context(id="step", args=[{"host": "h4"}], kwargs={}, group="g", chord=BODY)
    backend.mark_as_failure("step", lost, request=broken)
    assert recorded.calls == [("failure", lost)]
