"""disk.info: formats recorded once, read back, conflicts refused, stale records replaced."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.core import diskinfo
from domain.core.errors import DiskConflict, DiskNotFound
from tests.fakes.locks import InMemoryLease, InMemoryLocks


@pytest.fixture
def lease() -> Iterator[InMemoryLease]:
    """The instance's lease, held: record_format and forget_format run under it."""
    with InMemoryLocks()(diskinfo.instance_lease("vm")) as held:
        yield held


def test_record_then_read(tmp_path: Path, lease: InMemoryLease) -> None:
    # Given two disks of one instance recorded with their formats
    diskinfo.record_format(tmp_path, "disk", "qcow2", lease)
    diskinfo.record_format(tmp_path, "swap", "raw", lease)
    # Then each reads back, and the file is one JSON object
    assert diskinfo.read_format(tmp_path, "disk") == "qcow2"
    assert diskinfo.read_format(tmp_path, "swap") == "raw"
    assert diskinfo.read_format(tmp_path, "other") is None
    assert json.loads((tmp_path / "disk.info").read_text()) == {"disk": "qcow2", "swap": "raw"}
    assert not list(tmp_path.glob("*.part"))


def test_recording_the_same_format_again_is_a_no_op(tmp_path: Path, lease: InMemoryLease) -> None:
    diskinfo.record_format(tmp_path, "disk", "raw", lease)
    (tmp_path / "disk").write_bytes(b"")
    diskinfo.record_format(tmp_path, "disk", "raw", lease)
    assert diskinfo.read_formats(tmp_path) == {"disk": "raw"}


def test_another_format_for_an_existing_disk_is_a_conflict(
    tmp_path: Path, lease: InMemoryLease
) -> None:
    # Given a raw disk that exists with its record
    diskinfo.record_format(tmp_path, "disk", "raw", lease)
    (tmp_path / "disk").write_bytes(b"")
    # When something wants to record it as qcow2 (a guest-written header, a probe)
    with pytest.raises(DiskConflict, match="is recorded as a raw disk; the request wants qcow2"):
        diskinfo.record_format(tmp_path, "disk", "qcow2", lease)
    # Then the record is unchanged
    assert diskinfo.read_format(tmp_path, "disk") == "raw"


def test_record_of_a_disk_that_never_appeared_is_replaced(
    tmp_path: Path, lease: InMemoryLease
) -> None:
    # Given a record written before a crash that left no disk
    diskinfo.record_format(tmp_path, "disk", "qcow2", lease)
    # When the disk is created again with another backend
    diskinfo.record_format(tmp_path, "disk", "raw", lease)
    # Then the new format is recorded
    assert diskinfo.read_format(tmp_path, "disk") == "raw"


def test_require_format_needs_the_disk_and_its_record(tmp_path: Path, lease: InMemoryLease) -> None:
    with pytest.raises(DiskNotFound, match="there is no disk"):
        diskinfo.require_format(tmp_path, "disk")
    (tmp_path / "disk").write_bytes(b"")
    with pytest.raises(DiskNotFound, match="has no format record"):
        diskinfo.require_format(tmp_path, "disk")
    diskinfo.record_format(tmp_path, "disk", "qcow2", lease)
    assert diskinfo.require_format(tmp_path, "disk") == "qcow2"


def test_forget_removes_the_record_and_the_file_with_the_last(
    tmp_path: Path, lease: InMemoryLease
) -> None:
    diskinfo.record_format(tmp_path, "disk", "qcow2", lease)
    diskinfo.record_format(tmp_path, "swap", "raw", lease)
    diskinfo.forget_format(tmp_path, "disk", lease)
    assert diskinfo.read_formats(tmp_path) == {"swap": "raw"}
    diskinfo.forget_format(tmp_path, "swap", lease)
    assert not (tmp_path / "disk.info").exists()


@pytest.mark.parametrize("text", ["{not json", '["disk"]', '{"disk": "vmdk"}'])
def test_damaged_record_is_refused_not_guessed(tmp_path: Path, text: str) -> None:
    (tmp_path / "disk.info").write_text(text)
    with pytest.raises(DiskConflict, match="repair or remove it"):
        diskinfo.read_format(tmp_path, "disk")
