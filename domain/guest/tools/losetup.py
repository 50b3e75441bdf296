"""losetup(8): loop devices over a file, one partition at a time (`-o OFFSET --sizelimit SIZE`).

Loop partition scanning (`-P`) is not used: it does not work everywhere, and a loop device per
partition, with its offset and size limit, exposes exactly the bytes that were validated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from domain.core.errors import NoFreeDevice
from domain.core.runner import CommandError, Runner

LOSETUP = "losetup"
_NO_FREE = ("cannot find an unused loop device", "could not find any free loop device")


@dataclass(frozen=True)
class LoopDevice:
    name: str
    back_file: str
    offset: int
    sizelimit: int


def attach(runner: Runner, backing: Path, *, offset: int, size: int) -> str:
    """Attach a free loop device to `size` bytes of `backing` from `offset`; its /dev path."""
    argv = [LOSETUP, "--find", "--show", "--offset", str(offset), "--sizelimit", str(size)]
    try:
        result = runner.run([*argv, str(backing)], timeout=60)
    except CommandError as error:
        if any(text in str(error) for text in _NO_FREE):
            raise NoFreeDevice(f"no free loop device for {backing.name}: {error}") from None
        raise
    return result.stdout.strip()


def detach(runner: Runner, device: str) -> None:
    runner.run([LOSETUP, "--detach", device], timeout=60)


def devices(runner: Runner) -> list[LoopDevice]:
    """Every attached loop device with its backing file, offset and size limit."""
    result = runner.run(
        [LOSETUP, "--list", "--json", "--output", "NAME,BACK-FILE,OFFSET,SIZELIMIT"], timeout=60
    )
    if not result.stdout.strip():
        return []
    listed = json.loads(result.stdout).get("loopdevices", [])
    return [
        LoopDevice(
            name=str(item["name"]),
            back_file=str(item.get("back-file") or "").removesuffix(" (deleted)"),
            offset=int(item.get("offset") or 0),
            sizelimit=int(item.get("sizelimit") or 0),
        )
        for item in listed
    ]


def backed_by(runner: Runner, backing: Path, offset: int | None = None) -> list[LoopDevice]:
    """The loop devices over `backing` (at `offset`, when given)."""
    return [
        device
        for device in devices(runner)
        if device.back_file == str(backing) and (offset is None or device.offset == offset)
    ]
