"""The commands that are not workers run unprivileged too: started as root with
`privileges.user` set, Celery beat, Flower and the commands that talk to Redis or parse images
become that user (README, "Privileges"), after reading the files their caller names."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.privileges import WORKER_USER, open_directory, unprivileged_user
from helper import capabilities
from tests.integration.conftest import Cluster
from tests.support.cli import REPO, run_imgprep
from tests.support.guests import MiB
from tests.support.waiting import wait_for


@pytest.fixture
def as_user_env(clean_cluster: Cluster) -> dict[str, str]:
    """The cluster's environment, with the workers' user named (separated or not)."""
    unprivileged_user()
    return {**clean_cluster.env, "IMGPREP_PRIVILEGES__USER": WORKER_USER}


@pytest.fixture
def open_root() -> Iterator[Path]:
    with open_directory("cli") as root:
        yield root


def test_beat_started_as_root_runs_as_the_workers_user_without_capabilities(
    as_user_env: dict[str, str], open_root: Path
) -> None:
    # Given `imgprep beat` started as root with privileges.user set
    user = pwd.getpwnam(WORKER_USER)
    expected = user.pw_uid
    schedules = open_root / "beat"  # the user's, as the state directory is on a host
    schedules.mkdir()
    os.chown(schedules, user.pw_uid, user.pw_gid)
    log = (open_root / "beat.log").open("w")
    beat = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "beat", "--schedule", str(schedules / "schedule")],
        env=as_user_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        # Then, once it runs, every uid of the process is that user's and it holds no capability
        wait_for(
            lambda: beat.poll() is None and capabilities.uids(beat.pid) == (expected,) * 4,
            timeout=60,
            what="beat to run as the workers' user",
        )
        # and it is Celery beat that runs so (it writes its schedule as that user)
        schedule = wait_for(
            lambda: next(schedules.glob("schedule*"), None), timeout=60, what="beat's schedule"
        )
        assert schedule.stat().st_uid == expected
        sets = capabilities.sets(beat.pid)
        assert sets["CapEff"] == sets["CapPrm"] == sets["CapAmb"] == 0, sets
    finally:
        beat.terminate()
        beat.wait(timeout=60)
        log.close()


def test_inspect_parses_images_as_the_workers_user(
    as_user_env: dict[str, str], open_root: Path
) -> None:
    # Given the same image twice: readable by the workers' user, and readable by root alone
    shared = open_root / "shared.raw"
    with shared.open("wb") as image:
        image.truncate(4 * MiB)
    shared.chmod(0o644)
    private = open_root / "private.raw"
    private.write_bytes(shared.read_bytes())
    private.chmod(0o600)

    # When root inspects both with privileges.user set
    readable = run_imgprep(as_user_env, "inspect", str(shared))
    root_only = run_imgprep(as_user_env, "inspect", str(private))

    # Then the first is inspected, and the second cannot be read: inspection (qemu-img on
    # untrusted bytes) never ran as root
    assert readable.returncode == 0, readable.stderr
    assert "safe to use" in readable.stdout
    assert root_only.returncode != 0
    assert "Permission denied" in root_only.stderr or "not readable" in root_only.stderr
    # while without privileges.user root inspects it as before
    as_root = {key: value for key, value in as_user_env.items() if "PRIVILEGES" not in key}
    assert run_imgprep(as_root, "inspect", str(private)).returncode == 0
