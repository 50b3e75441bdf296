"""The test guest's cache: concurrent test processes build the guest once, and a builder killed
half-way leaves nothing a reader would take (worker/cli/demo/guest_image.py).

The root filesystem stage (debootstrap, a minute or two) is taken from the real cache as hard
links into the test's own cache directory, so only the disk stage (seconds) is built here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.boots import sha256
from tests.support.waiting import wait_for
from worker.cli.demo.guest_image import BUILDING, guest_image

pytestmark = [pytest.mark.boot, pytest.mark.timeout(1800)]

OBTAIN = (
    "import json, sys; from pathlib import Path; "
    "from worker.cli.demo.guest_image import guest_image; "
    "o = guest_image(cache=Path(sys.argv[1])); "
    "print(json.dumps({'built': o.built, 'directory': str(o.image.directory)}))"
)


def obtain(cache: Path) -> subprocess.Popen[str]:
    """A test process of its own asking for the guest in `cache` (in a process group of its own,
    with the tools it runs)."""
    return subprocess.Popen(
        [sys.executable, "-c", OBTAIN, str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        start_new_session=True,
    )


@pytest.fixture
def cache_with_rootfs(tmp_path: Path) -> Path:
    """A cache directory of the test's own holding the root filesystem stage, and no disk."""
    real = guest_image().image
    record = json.loads((real.directory / "guest.json").read_text())
    rootfs = real.directory.parent / record["rootfs"]
    cache = tmp_path / "cache"
    cache.mkdir()
    linked = subprocess.run(["cp", "-al", str(rootfs), str(cache)], check=False)
    if linked.returncode != 0:  # another filesystem: a copy
        subprocess.run(["cp", "-a", str(rootfs), str(cache)], check=True)
    return cache


def test_a_killed_builder_leaves_nothing_and_two_processes_build_once(
    cache_with_rootfs: Path,
) -> None:
    cache = cache_with_rootfs
    # Given a builder killed, with the tools it runs, while it builds the disk
    killed = obtain(cache)
    wait_for(
        lambda: any(cache.glob(f"{BUILDING}guest-*/disk.raw")),
        timeout=300,
        what="the builder to write its disk",
    )
    os.killpg(killed.pid, signal.SIGKILL)  # the group of the process this test started
    killed.wait()
    assert not list(cache.glob("guest-*")), "a half-built guest is under its final name"

    # When two processes ask for the guest at once
    first, second = obtain(cache), obtain(cache)
    # (each prints its outcome last, after the log lines of the commands it ran)
    outcomes = [json.loads(p.communicate(timeout=900)[0].splitlines()[-1]) for p in (first, second)]

    # Then one built it and the other waited and took the same entry
    assert sorted(o["built"] for o in outcomes) == [False, True]
    assert outcomes[0]["directory"] == outcomes[1]["directory"]
    # and what the killed builder left was removed, nothing else is half-built
    assert [p.name for p in cache.glob("guest-*")] == [Path(outcomes[0]["directory"]).name]
    assert not list(cache.glob(f"{BUILDING}*"))
    # and the entry is complete: its disks are the images its manifest names
    entry = guest_image(cache=cache)
    assert not entry.built
    assert sha256(entry.image.raw) == entry.image.raw_sha256
    assert sha256(entry.image.qcow2) == entry.image.qcow2_sha256
