"""One helper per socket: a second helper started on the socket a live helper serves refuses to
start and leaves the first one serving; only a dead helper's socket is taken over."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from harness.privileges import HelperProcess, open_directory, unprivileged_user
from tests.integration.devices import need_devices
from worker.privileges.helper_client import HelperClient

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _needs_devices() -> None:
    need_devices()
    unprivileged_user()


def test_a_second_helper_refuses_a_socket_a_live_helper_serves() -> None:
    with open_directory("sock") as root, HelperProcess.start(root) as first:
        # When a second helper is started on the same socket
        second = subprocess.run(
            first.process.args, capture_output=True, text=True, timeout=60, check=False
        )

        # Then it refuses to start, naming the socket
        assert second.returncode != 0
        assert str(first.socket_path) in second.stderr
        assert "already serving" in second.stderr
        # and the first one still serves it
        assert first.process.poll() is None
        HelperClient(first.socket_path).ping()


def test_a_dead_helpers_socket_is_taken_over() -> None:
    with open_directory("sock") as root:
        # Given a helper killed without a chance to remove its socket
        with HelperProcess.start(root) as dead:
            os.kill(dead.process.pid, signal.SIGKILL)
            dead.process.wait(timeout=30)
        stale = root / "run" / "helper.sock"
        assert stale.is_socket()

        # When another helper starts on it, then it serves there
        with HelperProcess.start(root) as helper:
            HelperClient(stale).ping()
            assert helper.process.poll() is None
