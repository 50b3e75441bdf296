"""imgprep.ping: the round trip that proves a worker consumes and can store results."""

from __future__ import annotations

import os

from worker.app import app
from worker.settings import get_settings


@app.task(name="imgprep.ping", acks_late=False)
def ping() -> dict[str, object]:
    """Answer with this worker's host id and process id."""
    return {"host": get_settings().host_id, "pid": os.getpid()}
