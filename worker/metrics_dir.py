"""The multiprocess directory of a worker's metrics: set up before prometheus_client is imported.

prometheus-client picks its multiprocess mode when imported, from PROMETHEUS_MULTIPROC_DIR.
`imgprep worker` calls `use_metrics_dir` first: a fresh `<state_dir>/metrics/<pid>` for this
worker (several workers may share a host), and the directories of workers that are gone removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from worker.settings import Settings

ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_metrics_dir(settings: Settings) -> Path | None:
    if not settings.metrics.enabled:
        return None
    parent = settings.state_dir / "metrics"
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.iterdir():
        if old.name.isdigit() and not Path(f"/proc/{old.name}").exists():
            shutil.rmtree(old, ignore_errors=True)
    directory = parent / str(os.getpid())
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    os.environ[ENV] = str(directory)
    return directory
