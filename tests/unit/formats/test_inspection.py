"""Inspection against real crafted images: every hostile image refused with its reason, safe
images accepted as what they are. Real qemu-img builds them; no qemu-img opens them here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from domain.core.errors import ImageRefused
from domain.formats.inspection import detected_format, inspect_image
from tests.conftest import write_raw_image
from tests.support.hostile_images import HOSTILE, Hostile, build
from worker.cli.demo.sample_images import Partition, partitioned_disk

MiB = 2**20


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.name)
def test_hostile_image_is_refused_with_its_reason(hostile: Hostile, tmp_path: Path) -> None:
    # Given a hostile image built for real
    path = build(hostile, tmp_path)
    # When it is inspected as the image service declared it
    with pytest.raises(ImageRefused) as refused:
        inspect_image(path, hostile.declared)
    # Then the refusal names the reason
    assert hostile.reason in str(refused.value)


@pytest.mark.parametrize(
    "hostile",
    [h for h in HOSTILE if h.name not in ("qcow2-declared-raw", "noise-declared-qcow2")],
    ids=lambda h: h.name,
)
def test_unsafe_image_is_refused_whatever_it_is_declared(hostile: Hostile, tmp_path: Path) -> None:
    # Given an image that is unsafe in itself (not merely declared wrongly)
    path = build(hostile, tmp_path)
    # Then it is refused for the same reason without a declaration
    with pytest.raises(ImageRefused) as refused:
        inspect_image(path, "auto")
    assert hostile.reason in str(refused.value)


@pytest.mark.parametrize(
    ("options", "fmt"),
    [
        (["-f", "qcow2"], "qcow2"),
        (["-f", "qcow2", "-o", "compat=0.10"], "qcow2"),
        (["-f", "vmdk"], "vmdk"),
        (["-f", "vmdk", "-o", "subformat=streamOptimized"], "vmdk"),
    ],
)
def test_self_contained_images_pass_as_what_they_are(
    options: list[str], fmt: str, tmp_path: Path
) -> None:
    path = tmp_path / "image"
    subprocess.run(["qemu-img", "create", "-q", *options, str(path), "64M"], check=True)
    inspected = inspect_image(path, fmt)
    assert (inspected.format, inspected.virtual_size) == (fmt, 64 * MiB)
    assert inspect_image(path).format == fmt


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_partitioned_raw_disk_is_raw(label: str, tmp_path: Path) -> None:
    # An MBR or GPT disk is raw bytes to qemu, whatever the inspector calls it
    path = tmp_path / "disk.raw"
    partitioned_disk(path, [Partition(size_mib=4), Partition(size_mib=4)], label=label)
    inspected = inspect_image(path, "raw")
    assert inspected.format == "raw" and inspected.detail == "gpt"
    assert inspected.virtual_size == path.stat().st_size


def test_plain_raw_data_is_raw_with_its_file_size(tmp_path: Path) -> None:
    path = write_raw_image(tmp_path / "x.raw", size=8 * MiB, data=b"data" * 1024)
    assert inspect_image(path, "raw").virtual_size == 8 * MiB
    assert detected_format(path) == "raw"


def test_detected_format_of_unparseable_file_is_none(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    # an empty file is raw to the inspector; a missing one cannot be told
    assert detected_format(path) == "raw"
    assert detected_format(tmp_path / "missing") is None
