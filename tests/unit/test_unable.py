"""A test this machine cannot run (no root, no FUSE, no tmpfs) is skipped on a developer's
machine and fails under CI=true, so a CI machine that cannot mount never passes silently."""

from __future__ import annotations

import pytest

from tests.conftest import unable


def test_skipped_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs /dev/fuse"):
        unable("needs /dev/fuse")


def test_failed_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"needs /dev/fuse.*CI=true"):
        unable("needs /dev/fuse")
