"""harness.privileges.open_directory, the directory the privileged tests work in: a mount left
under it fails the test that leaked it and is released, never left on the machine (five FUSE
mounts of an earlier session's trust tests outlived their directories that way)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.machine import mounts_under
from harness.privileges import open_directory


def mount_and_leave(seen: list[Path]) -> None:
    """A block that mounts something under its directory and does not unmount it."""
    with open_directory("leak") as root:
        seen.append(root)
        (root / "point").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "leak", str(root / "point")], check=True)


def test_a_mount_left_under_the_directory_fails_the_block_and_is_released() -> None:
    # Given a block that leaves a mount under its directory
    seen: list[Path] = []

    # When it ends, then it fails naming what was released
    with pytest.raises(AssertionError, match="unmounted"):
        mount_and_leave(seen)

    # and neither the mount nor the directory is left
    assert mounts_under(seen[0]) == []
    assert not seen[0].exists()


def test_a_clean_block_passes_and_leaves_nothing() -> None:
    with open_directory("clean") as root:
        (root / "file").write_text("x")
    assert not root.exists()
