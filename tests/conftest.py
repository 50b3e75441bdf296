"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

from domain.core.runner import Runner
from worker.settings import CONFIG_ENV, REPO_CONFIG

# Tests read the checkout's settings file, never this machine's /etc/imgprep/imgprep.toml
# (scripts/install.sh writes one): what a test runs does not depend on the host it runs on.
os.environ.setdefault(CONFIG_ENV, str(REPO_CONFIG))


def unable(reason: str) -> NoReturn:
    """This machine cannot run the test: skip it, with the reason, on a developer's machine;
    fail it under CI=true, so that a CI machine that cannot mount never passes silently."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the CI machine must be able to run every test)")
    pytest.skip(reason)


def need_root() -> None:
    """A test that needs root, on a machine that does not give it: skipped (failed in CI)."""
    if os.geteuid() != 0:
        unable("needs root (loop devices, mounts); run the suite as root")


def need_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run scripts/install.sh")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `root` needs root: without it, `unable` (skipped; failed under CI=true)."""
    if item.get_closest_marker("root") is not None:
        need_root()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadgroup` with the groups of tests/support/parallel.py (scripts/test.sh)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from tests.support.parallel import GroupScheduling

    return GroupScheduling(config, log)


@pytest.fixture
def runner() -> Runner:
    return Runner(default_timeout=120)


@pytest.fixture
def random_bytes() -> bytes:
    return os.urandom(256 * 1024)


def write_raw_image(path: Path, *, size: int, data: bytes) -> Path:
    """A sparse raw image of `size` bytes with `data` at its start and at its middle."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.write(data)
        handle.seek(size // 2)
        handle.write(data)
    return path
