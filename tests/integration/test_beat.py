"""`imgprep beat` for real: it sends imgprep.evict_cache on its interval and a worker runs it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import Cluster

REPO = Path(__file__).resolve().parents[2]


def eviction_reports(cluster: Cluster) -> list[dict[str, object]]:
    """Results of imgprep.evict_cache runs in the result backend (result_extended names them)."""
    reports = []
    for key in cluster.redis.scan_iter(match="celery-task-meta-*"):
        raw = cluster.redis.get(key)
        meta = json.loads(raw) if raw else {}
        if meta.get("name") == "imgprep.evict_cache" and meta.get("status") == "SUCCESS":
            reports.append(meta["result"])
    return reports


def test_beat_sends_the_cache_manager_on_its_interval(clean_cluster: Cluster) -> None:
    # Given beat with a one-second interval for the cache manager
    before = len(eviction_reports(clean_cluster))
    env = {**clean_cluster.env, "IMGPREP_IMAGE_CACHE__MANAGER_INTERVAL_SECONDS": "1"}
    log_path = clean_cluster.root / "logs" / "beat.log"
    with open(log_path, "ab") as log:
        beat = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "beat"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        # When it runs for a while (until two passes have been run by the workers)
        deadline = time.monotonic() + 60
        while len(eviction_reports(clean_cluster)) < before + 2 and time.monotonic() < deadline:
            assert beat.poll() is None, log_path.read_text()
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(timeout=30)

    # Then the workers ran the cache manager, each pass reporting on the shared cache
    reports = eviction_reports(clean_cluster)
    assert len(reports) >= before + 2, log_path.read_text()
    assert all(r["kind"] == "cache_eviction_report" and not r["dry_run"] for r in reports)
    # with the default minimum age of a day nothing this fresh was removed
    assert all(r["evicted"] == [] for r in reports)
    assert (clean_cluster.settings.state_dir / "celerybeat-schedule").exists() or any(
        p.name.startswith("celerybeat-schedule") for p in clean_cluster.settings.state_dir.iterdir()
    )
