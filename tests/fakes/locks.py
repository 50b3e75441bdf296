"""In-memory lease locks (the LockFactory port): one process, threads wait on a condition."""

from __future__ import annotations

import itertools
import threading
import time
from types import TracebackType

from domain.core.errors import LockBusy, LockLost


class InMemoryLocks:
    """A LockFactory: `locks(name)` is a Lease on `name`; `wait` seconds before LockBusy."""

    def __init__(self, wait: float = 0.0) -> None:
        self.wait = wait
        self.held: dict[str, int] = {}  # name → fence of its holder
        self.taken: list[str] = []  # every name ever acquired, in order
        self._fences = itertools.count(1)
        self._changed = threading.Condition()

    def __call__(self, name: str) -> InMemoryLease:
        return InMemoryLease(self, name)

    def take_over(self, name: str) -> None:
        """Another holder takes `name` (its lease passed on): the current holder has lost it."""
        with self._changed:
            self.held[name] = next(self._fences)

    def _acquire(self, name: str) -> int:
        deadline = time.monotonic() + self.wait
        with self._changed:
            while name in self.held:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockBusy(f"lock {name} is still held after {self.wait:.0f} s")
                self._changed.wait(left)
            fence = next(self._fences)
            self.held[name] = fence
            self.taken.append(name)
            return fence

    def _release(self, name: str, fence: int) -> bool:
        with self._changed:
            if self.held.get(name) != fence:
                return False
            del self.held[name]
            self._changed.notify_all()
            return True

    def _owns(self, name: str, fence: int) -> bool:
        with self._changed:
            return self.held.get(name) == fence


class InMemoryLease:
    """One acquisition of a lock (the Lease port)."""

    def __init__(self, locks: InMemoryLocks, name: str) -> None:
        self.locks = locks
        self.name = name
        self._fence: int | None = None

    @property
    def fence(self) -> int:
        if self._fence is None:
            raise LockLost(f"lock {self.name} is not held")
        return self._fence

    def ensure_held(self) -> None:
        if self._fence is None or not self.locks._owns(self.name, self._fence):
            raise LockLost(f"lock {self.name} was taken over")

    def __enter__(self) -> InMemoryLease:
        self._fence = self.locks._acquire(self.name)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fence is not None:
            self.locks._release(self.name, self._fence)
            self._fence = None
