"""What domain code needs from the runtime, as protocols: locks and progress reports.

Domain functions take these as arguments; worker/ supplies the Redis-backed implementations and
tests may supply simpler ones. Nothing here imports Celery or Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Protocol


class Lease(Protocol):
    """A lock held for a lease that is renewed while the holder works."""

    @property
    def fence(self) -> int:
        """A number that grows with every acquisition of any lock: recorded beside what the
        holder publishes, so a later reader can tell which holder wrote it."""
        ...

    def __enter__(self) -> Lease: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def ensure_held(self) -> None:
        """Raise LockLost unless this holder still owns the lock, and extend the lease so that
        it stays owned for the commit that follows (the fence before a rename)."""
        ...


LockFactory = Callable[[str], Lease]
"""Makes the lease lock for a resource name such as ``cache:<key>``."""


class Progress(Protocol):
    """Receives progress of a long step; implementations throttle as they see fit."""

    def __call__(self, done: int, total: int | None) -> None: ...


def no_progress(done: int, total: int | None) -> None:
    """A progress sink that ignores reports."""


class References(Protocol):
    """Which holders use each cached base, across every host: instance disks whose backing file
    it is, and pins of canvases between fetching the base and creating the disk."""

    def add(self, key: str, holder: str) -> None:
        """Record that `holder` uses the base `key` (idempotent)."""
        ...

    def discard(self, key: str, holder: str) -> None: ...

    def add_unless_evicting(self, key: str, holder: str) -> bool:
        """Atomically: record `holder` unless the cache manager is removing `key` right now
        (`begin_eviction` without `end_eviction` yet); whether it was recorded."""
        ...

    def begin_eviction(self, key: str, lease_seconds: float) -> bool:
        """Atomically: if nothing holds `key`, mark it as being removed (for at most
        `lease_seconds`) and return True; False when a holder appeared."""
        ...

    def end_eviction(self, key: str) -> None: ...

    def holders(self, key: str) -> dict[str, float]:
        """Each holder of `key` and when (epoch seconds) it was recorded."""
        ...

    def forget(self, holder: str) -> list[str]:
        """Drop `holder` from every base; the keys it held."""
        ...
