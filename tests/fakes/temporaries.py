"""In-memory temporary names (the Temporaries port)."""

from __future__ import annotations


class InMemoryTemporaries:
    def __init__(self) -> None:
        self.sets: dict[str, set[str]] = {}

    def add(self, resource: str, name: str) -> None:
        self.sets.setdefault(resource, set()).add(name)

    def discard(self, resource: str, name: str) -> None:
        self.sets.get(resource, set()).discard(name)
        if not self.sets.get(resource):
            self.sets.pop(resource, None)

    def members(self, resource: str) -> list[str]:
        return sorted(self.sets.get(resource, set()))


class InMemoryImageUsage:
    def __init__(self) -> None:
        self.used: dict[str, float] = {}

    def touch(self, resource: str) -> None:
        import time

        self.used[resource] = time.time()

    def last_used(self, resource: str) -> float | None:
        return self.used.get(resource)

    def forget(self, resource: str) -> None:
        self.used.pop(resource, None)
