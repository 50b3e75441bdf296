"""`imgprep ARGS` run as a person runs it: a process of its own, in a given environment."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_imgprep(
    env: Mapping[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`imgprep ARGS` (python -m worker.cli) with `env`, from the checkout; its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        check=False,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
