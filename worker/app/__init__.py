"""The Celery edge: the application, the task bases and what a worker process runs around them.

`app` is the Celery application (`celery -A worker.app ...`, `from worker.app import app`). It
is made on first use of the name, not when the package is imported, as Celery's own package
makes its attributes lazily: importing a task base (worker.app.taskbase) or the runtime does not
build the application, connect its signals or make it the current app.

- application: the app and its configuration from settings (create_app, celery_config)
- taskbase, entry, redacting, redelivery, publishing, progress: what every task runs on
- signals, runtime, janitor, device_steps: a worker process's handlers and collaborators
- results, pool, routing, schedule: result backend, process pool, queues, beat's schedule
- wire_schemas: the wire contract as JSON Schema files
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.app.application import app as app


def __getattr__(name: str) -> Any:
    if name == "app":
        from worker.app.application import app

        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
