"""Opening the worker's files for a root tool: no link on the whole path is followed, and only a
regular file of root or the workers' user is handed over (domain.guest.held_files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from domain.core.errors import DeviceError, PrivilegeRefused
from domain.guest.held_files import fd_path, held

# The files handed over belong to root or to the workers' user: making them takes chown.
pytestmark = pytest.mark.root

WORKER = 4242
OWNERS = frozenset({0, WORKER})


def hold(path: Path) -> None:
    with held(path, write=False, owners=OWNERS):
        pass


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "instances" / "vm" / "disk"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"disk bytes")
    os.chown(path, WORKER, WORKER)
    return path


def test_a_regular_file_of_the_worker_is_held_open(disk: Path) -> None:
    with held(disk, write=True, owners=OWNERS) as fd:
        assert os.read(fd, 4) == b"disk"
        assert os.readlink(fd_path(fd)) == str(disk)


def test_a_link_as_the_file_or_on_the_way_is_refused(disk: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    link = disk.parent / "link"
    link.symlink_to(secret)
    with pytest.raises(PrivilegeRefused, match="symbolic link"):
        hold(link)
    # a directory on the way that is a link to the instance's directory
    (tmp_path / "via").symlink_to(disk.parent)
    with pytest.raises(PrivilegeRefused, match="symbolic link"):
        hold(tmp_path / "via" / "disk")
    # where the caller is trusted (a worker running as root, no helper), links are followed
    with held(link, write=False, owners=None) as fd:
        assert os.read(fd, 4) == b"root"


def test_anything_but_a_regular_file_of_root_or_the_worker_is_refused(
    disk: Path, tmp_path: Path
) -> None:
    os.chown(disk, 1234, 1234)
    with pytest.raises(PrivilegeRefused, match="uid 1234"):
        hold(disk)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PrivilegeRefused, match="not a regular file"):
        hold(fifo)
    with pytest.raises(DeviceError, match="does not exist"):
        hold(tmp_path / "missing")
