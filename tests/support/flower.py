"""A real `imgprep flower` process for tests, read through its HTTP API; ended by its pid."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from celery import Celery

REPO = Path(__file__).resolve().parents[2]


@dataclass
class FlowerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> urllib3.BaseHTTPResponse:
        return urllib3.PoolManager().request("GET", self.url + path, timeout=10, retries=False)

    def api(self, path: str) -> Any:
        response = self.get(path)
        assert response.status == 200, f"{path}: HTTP {response.status} {response.data[:200]!r}"
        return json.loads(response.data)

    def tasks(self) -> dict[str, dict[str, Any]]:
        return dict(self.api("/api/tasks"))

    def wait_http(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower exited; see {self.log_path}")
            with contextlib.suppress(urllib3.exceptions.HTTPError):
                if self.get("/healthcheck").status == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"flower did not answer within {timeout} s; see {self.log_path}")

    def wait_capturing(self, celery_app: Celery, timeout: float = 60) -> None:
        """Block until Flower has seen the events of a real task (a ping): only then would it
        see every event of the tasks a test sends next."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ping = celery_app.send_task("imgprep.ping", queue="imgprep")
            ping.get(timeout=30)
            for _ in range(20):
                if self.tasks().get(ping.id, {}).get("state") == "SUCCESS":
                    return
                time.sleep(0.1)
        raise TimeoutError(f"flower saw no task events within {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def start_flower(*, port: int, env: dict[str, str], log_path: Path) -> FlowerProcess:
    """`imgprep flower` on 127.0.0.1:`port`, its API open (FLOWER_UNAUTHENTICATED_API)."""
    argv = [sys.executable, "-m", "worker.cli", "flower", f"--port={port}", "--address=127.0.0.1"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
            cwd=log_path.parent,  # Flower looks for flowerconfig.py in its working directory
            start_new_session=True,
        )
    return FlowerProcess(process=process, port=port, log_path=log_path)
