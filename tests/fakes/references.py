"""In-memory references to cached bases (the References port)."""

from __future__ import annotations

import time
from collections.abc import Callable


class InMemoryReferences:
    """Holders of each cache key with the time they were recorded, and eviction marks."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.refs: dict[str, dict[str, float]] = {}
        self.evicting: set[str] = set()

    def add(self, key: str, holder: str) -> None:
        self.refs.setdefault(key, {})[holder] = self.clock()

    def discard(self, key: str, holder: str) -> None:
        held = self.refs.get(key, {})
        held.pop(holder, None)
        if not held:
            self.refs.pop(key, None)

    def add_unless_evicting(self, key: str, holder: str) -> bool:
        if key in self.evicting:
            return False
        self.add(key, holder)
        return True

    def begin_eviction(self, key: str, lease_seconds: float) -> bool:
        if self.refs.get(key):
            return False
        self.evicting.add(key)
        return True

    def end_eviction(self, key: str) -> None:
        self.evicting.discard(key)

    def holders(self, key: str) -> dict[str, float]:
        return dict(self.refs.get(key, {}))

    def forget(self, holder: str) -> list[str]:
        released = sorted(key for key, held in self.refs.items() if holder in held)
        for key in released:
            self.discard(key, holder)
        return released
