"""Requests of the formats work: reserved disk names, snapshot options, target paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from domain.core.errors import InvalidRequest
from domain.core.models import DiskSpec
from domain.core.paths import path_under
from domain.formats.snapshot_models import SnapshotRequest


@pytest.mark.parametrize("name", ["disk.info", "disk.part", "x.json.part"])
def test_disk_names_beside_which_imgprep_writes_are_reserved(name: str) -> None:
    with pytest.raises(ValidationError, match="reserved"):
        DiskSpec(instance_id="vm", disk_name=name, size_bytes=1)
    with pytest.raises(ValidationError, match="reserved"):
        SnapshotRequest(instance_id="vm", disk_name=name, target="x")


def test_compression_needs_qcow2() -> None:
    with pytest.raises(ValidationError, match="compress is only possible with format qcow2"):
        SnapshotRequest(instance_id="vm", target="x.raw", format="raw", compress=True)
    assert SnapshotRequest(instance_id="vm", target="x", compress=True).format == "qcow2"


def test_targets_resolve_under_the_root(tmp_path: Path) -> None:
    # relative targets, with directories created, and absolute ones inside the root
    assert path_under(tmp_path, "a/b/image.qcow2", create_parents=True) == (
        tmp_path / "a" / "b" / "image.qcow2"
    )
    assert (tmp_path / "a" / "b").is_dir()
    assert path_under(tmp_path, str(tmp_path / "a" / "x.raw")) == tmp_path / "a" / "x.raw"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("../x", "'..' is not a valid name"),
        ("a/../../x", "'..' is not a valid name"),
        ("/etc/passwd", "is outside"),
        ("", "names no file"),
        ("x.json", "reserved"),
        ("x.part", "reserved"),
    ],
)
def test_targets_outside_the_root_are_refused(tmp_path: Path, target: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        path_under(tmp_path, target, create_parents=True)


def test_symbolic_links_are_not_followed_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(InvalidRequest, match="symbolic link"):
        path_under(root, "escape/x.qcow2", create_parents=True)
    (root / "link.qcow2").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidRequest, match="symbolic link"):
        path_under(root, "link.qcow2")
