"""Wire models: names that are safe path components, strict fields, normalised checksums."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from domain.cache.directory import cache_key
from domain.core.models import DiskSpec, ImageSource, PrepareRequest


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
