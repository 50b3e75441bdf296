"""The ports every feature of the domain shares, as protocols: locks with a lease (`Lease`,
`LockFactory`) and progress reports (`Progress`).

Each feature declares the ports only it needs beside its code: the cache's references and peer
registry (domain.cache.ports), the device records of instance disks (domain.disks.ports), the
operations that need root (domain.guest.ports), the RBD backend's temporaries and imported images
(domain.rbd.ports); the step journal's port is with its records (domain.core.journal). Domain
functions take these as arguments; worker/ supplies the Redis adapters
(worker.stores.redis_locks for the locks here) and tests/fakes the in-memory ones. Nothing
here imports Celery or Redis.
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
