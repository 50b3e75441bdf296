"""Headless Chromium (Debian's chromium package): screenshots and rendered DOM of a page."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise RuntimeError("chromium is not installed: run scripts/install.sh")
    return binary


def _run(url: str, *extra: str, budget_ms: int) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="imgprep-chromium-") as profile:
        return subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--window-size=1600,900",
                # Let the page's scripts load its data (Flower fetches the task table by XHR).
                f"--virtual-time-budget={budget_ms}",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def screenshot(url: str, path: Path, budget_ms: int = 8000) -> Path:
    """A PNG of `url` as rendered, at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    done = _run(url, f"--screenshot={path}", budget_ms=budget_ms)
    if not path.is_file():
        raise RuntimeError(f"chromium made no screenshot of {url}: {done.stderr[-2000:]}")
    return path


def rendered_dom(url: str, budget_ms: int = 8000) -> str:
    """The DOM of `url` after its scripts ran, as HTML."""
    done = _run(url, "--dump-dom", budget_ms=budget_ms)
    if done.returncode != 0 or "<html" not in done.stdout:
        raise RuntimeError(f"chromium could not render {url}: {done.stderr[-2000:]}")
    return done.stdout
