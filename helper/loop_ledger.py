"""The helper's own ledger of the loop devices it attached, kept where only root can write.

The worker's device records live in Redis, which any host of the fleet can write to, so the
helper does not take them as proof. Before attaching a loop device it records the backing file
and offset it is about to attach (an intent: if the helper dies before losetup answers, the
device is still recognised by what the kernel says backs it), then the device; a detach or a
kernel mount of a device is refused unless the kernel reports that device over a backing file
and offset recorded here. Detaching drops the entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, TypeAdapter

from helper.checks import Refused


class LoopEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backing: str
    offset: int
    device: str | None = None


_ENTRIES: TypeAdapter[list[LoopEntry]] = TypeAdapter(list[LoopEntry])


def kernel_view(device: str) -> tuple[str, int] | None:
    """The backing file and offset the kernel reports for `device`, or None if detached."""
    loop = Path("/sys/block") / Path(device).name / "loop"
    try:
        backing = (loop / "backing_file").read_text().strip().removesuffix(" (deleted)")
        offset = int((loop / "offset").read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None
    return backing, offset


class LoopLedger:
    """`loops.json` in the helper's state directory (0700, root); changes are serialised by a
    thread lock and, across helpers of one host sharing the directory, by flock(2)."""

    def __init__(self, state_dir: Path) -> None:
        # 0711: the workers' user may pass through to the device work areas (`devices`), but
        # not list what is here; the ledger itself is 0600
        state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o711)  # noqa: S103 - search only, for the work areas inside
        self.path = state_dir / "loops.json"
        self._threads = threading.Lock()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with self._threads, open(self.path.with_suffix(".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def entries(self) -> list[LoopEntry]:
        try:
            return _ENTRIES.validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return []

    def _write(self, entries: list[LoopEntry]) -> None:
        temporary = self.path.with_suffix(f".tmp.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as handle:
            handle.write(_ENTRIES.dump_json(entries))
        os.replace(temporary, self.path)

    def intend(self, backing: str, offset: int) -> None:
        with self._lock():
            entries = [e for e in self.entries() if (e.backing, e.offset) != (backing, offset)]
            self._write([*entries, LoopEntry(backing=backing, offset=offset)])

    def attached(self, backing: str, offset: int, device: str) -> None:
        with self._lock():
            entries = [e for e in self.entries() if (e.backing, e.offset) != (backing, offset)]
            self._write([*entries, LoopEntry(backing=backing, offset=offset, device=device)])

    def forget(self, backing: str, offset: int) -> None:
        with self._lock():
            entries = self.entries()
            kept = [e for e in entries if (e.backing, e.offset) != (backing, offset)]
            if len(kept) != len(entries):
                self._write(kept)

    def recorded(self, device: str) -> tuple[str, int]:
        """The backing file and offset of `device` if this helper attached it; else Refused."""
        view = kernel_view(device)
        if view is None:
            raise Refused(f"{device} is not attached")
        backing, offset = view
        for entry in self.entries():
            if (entry.backing, entry.offset) == view and entry.device in (None, device):
                return backing, offset
        raise Refused(
            f"{device} (over {backing} at offset {offset}) is not a loop device this helper "
            "attached"
        )
