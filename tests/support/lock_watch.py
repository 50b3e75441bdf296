"""What a lease lock asks of Redis while it waits (worker.stores.redis_locks.LeaseLock): its
attempts to take the lock and its blocks on the release signal, so that a test can tell a waiter
woken by a release from one that polled, without timing it (the hand-off's figures:
bench/lock_handoff.py)."""

from __future__ import annotations

import threading
from typing import Any

from worker.stores.redis_locks import LeaseLock


class WatchedWaits:
    """The calls `lock` makes to Redis from now on: "attempt" (the acquire script), "block" (a
    BLPOP on the release signal) or "other"; `blocked` is set once it blocks."""

    def __init__(self, lock: LeaseLock) -> None:
        self.calls: list[str] = []
        self.blocked = threading.Event()
        through = lock._redis

        def watched(call: Any, *args: Any, **kwargs: Any) -> Any:
            if call is lock._acquire_script:
                self.calls.append("attempt")
            elif getattr(call, "__name__", "") == "blpop":
                self.calls.append("block")
                self.blocked.set()
            else:
                self.calls.append("other")
            return through(call, *args, **kwargs)

        lock._redis = watched  # type: ignore[method-assign]

    def attempts(self) -> int:
        return self.calls.count("attempt")
