"""A Redis that does not answer is one clear line from the CLI, after the outage it waits out."""

from __future__ import annotations

import os
import socket

import pytest

from tests.support.cli import run_imgprep


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("command", [["status", "some-task-id"], ["cache", "list"]])
def test_a_command_against_an_absent_redis_says_so_in_one_line(command: list[str]) -> None:
    # Given settings naming a Redis that does not answer, and an outage of 1 s to wait out
    url = f"redis://127.0.0.1:{closed_port()}/0"
    env = {
        **os.environ,
        "IMGPREP_REDIS_URL": url,
        "IMGPREP_BROKER_URL": url,
        "IMGPREP_RESULT_BACKEND": url,
        "IMGPREP_REDIS_OUTAGE_SECONDS": "1",
    }
    env.pop("IMGPREP_PRIVILEGES__USER", None)

    # When a person runs the command
    done = run_imgprep(env, *command, timeout=120)

    # Then it fails with one line naming Redis and why, and no traceback or retry log
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"imgprep: Redis did not answer ({url}; waited about 1 s): ")
    assert "Connection refused" in done.stderr
