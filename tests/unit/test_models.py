"""Wire models: names that are safe path components, strict fields, normalised checksums."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from domain.cache.directory import cache_key
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from worker.sizes import human, parse_size


@pytest.mark.parametrize(
    "name", ["..", ".", "a/b", ".hidden", "", "x" * 129, "a b", "disk\x00", "-flag"]
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        DiskSpec(instance_id=name, size_bytes=1)
    with pytest.raises(ValidationError):
        DiskSpec(instance_id="vm", disk_name=name, size_bytes=1)


@pytest.mark.parametrize("name", ["vm-1", "0d5f.disk", "a_b", "A" * 128, "disk.config"])
def test_safe_names_are_accepted(name: str) -> None:
    assert DiskSpec(instance_id=name, disk_name=name, size_bytes=1).instance_id == name


def test_checksum_is_normalised_and_checked() -> None:
    source = ImageSource(url="https://h/i", image_id="i", checksum="SHA256:" + "AB" * 32)
    assert source.checksum == "sha256:" + "ab" * 32
    with pytest.raises(ValidationError):
        ImageSource(url="https://h/i", image_id="i", checksum="md5:abc")


def test_unknown_fields_are_errors_not_defaults() -> None:
    with pytest.raises(ValidationError, match="sise_bytes"):
        PrepareRequest.model_validate(
            {
                "image": {"url": "https://h/i", "image_id": "i"},
                "disk": {"instance_id": "vm", "sise_bytes": 1},
            }
        )


def test_url_must_be_absolute() -> None:
    with pytest.raises(ValidationError, match="absolute URL"):
        ImageSource(url="image.qcow2", image_id="i")


def test_cache_key_is_a_hash_not_a_path() -> None:
    key = cache_key("../../etc/passwd")
    assert len(key) == 40 and set(key) <= set("0123456789abcdef")
    assert cache_key("img") == cache_key("img") != cache_key("img2")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10G", 10 * 2**30),
        ("512M", 512 * 2**20),
        ("1.5K", 1536),
        ("20GiB", 20 * 2**30),
        ("4096", 4096),
        ("1t", 2**40),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "-1G", "0", "1.3"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|bytes"):
        parse_size(text)


def test_human_sizes() -> None:
    assert human(1536) == "1.5 KiB"
    assert human(10 * 2**30) == "10.0 GiB"
