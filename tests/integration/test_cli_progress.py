"""`imgprep prepare --wait` while it runs: bars on a terminal, lines in a pipe, JSON alone."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from worker.cli.demo.image_server import ImageServer

MiB = 2**20
REPO = Path(__file__).resolve().parents[2]


def prepare_args(image_server: ImageServer, size: int = 8 * MiB) -> list[str]:
    name = unique("progress") + ".raw"
    write_raw_image(image_server.root / name, size=size, data=os.urandom(64 * 1024))
    return [
        sys.executable,
        "-m",
        "worker.cli",
        "prepare",
        image_server.url(name),
        "--image-id",
        unique("img"),
        "--instance",
        unique("vm"),
        "--size",
        "64M",
        "--wait",
    ]


def test_pipe_gets_one_line_per_change_on_stderr_and_the_result_on_stdout(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given an image served slowly enough to report progress
    image_server.bytes_per_second = 4 * MiB
    # When prepare --wait runs with its output piped
    done = subprocess.run(
        prepare_args(image_server),
        env=clean_cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    # Then stderr has each step's progress and end, and stdout only the result
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    fetch = [line for line in lines if line.startswith("fetch_to_cache")]
    assert any("PROGRESS" in line and "% " in line and "of 8.0 MiB" in line for line in fetch)
    assert any("SUCCESS" in line for line in fetch)
    assert any(line.startswith("create_overlay") and "SUCCESS" in line for line in lines)
    assert "\x1b[" not in done.stderr  # no terminal control codes in a pipe
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["disk", "base", "task"]


def test_terminal_gets_live_progress_bars(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given an image served slowly, and a pseudo-terminal for the command's output
    image_server.bytes_per_second = 4 * MiB
    controller, terminal = pty.openpty()
    env = {**clean_cluster.env, "TERM": "xterm-256color", "COLUMNS": "120"}
    # When prepare --wait runs on the terminal
    process = subprocess.Popen(
        prepare_args(image_server),
        env=env,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=REPO,
        close_fds=True,
    )
    os.close(terminal)
    screen = read_until_exit(controller, process)
    # Then the terminal showed a bar per step, redrawn in place, ending in SUCCESS
    assert process.returncode == 0, screen
    assert "fetch_to_cache" in screen and "create_overlay" in screen
    assert "━" in screen  # rich's bar
    assert "\x1b[" in screen  # redrawn with cursor controls
    assert screen.count("fetch_to_cache") > 1  # live: drawn more than once
    assert "SUCCESS" in screen and "8.0/8.0 MiB" in screen


def test_json_prints_only_the_result(clean_cluster: Cluster, image_server: ImageServer) -> None:
    done = subprocess.run(
        [*prepare_args(image_server, size=2 * MiB), "--json"],
        env=clean_cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kind"] == "prepared_disk"
    assert "fetch_to_cache" not in done.stderr


def read_until_exit(fd: int, process: subprocess.Popen[bytes], timeout: float = 120) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            process.kill()
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=30)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")
