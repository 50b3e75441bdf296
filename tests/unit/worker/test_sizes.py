"""Disk sizes as people write them, and as the CLI prints them."""

from __future__ import annotations

import pytest

from worker.cli.sizes import human, parse_size


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
