"""Disk sizes as people write them: 10G, 512M, 1.5T, 20GiB or plain bytes (binary units, as
qemu-img reads them)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`; ValueError when it is not a size."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 10G, 512M, 1073741824)")
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value < 1 or value != int(value):
        raise ValueError(f"{text!r} is not a whole, positive number of bytes")
    return int(value)


def human(size: int) -> str:
    """`size` bytes in the largest binary unit that keeps one decimal (1.5 GiB)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
