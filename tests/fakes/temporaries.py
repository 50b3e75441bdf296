"""In-memory fakes of the rbd backend's ports (Temporaries, ImportedImages)."""

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


class InMemoryImportedImages:
    def __init__(self) -> None:
        self.used: dict[str, float] = {}
        self.records: dict[str, str] = {}

    def remember(self, resource: str, record: str) -> None:
        self.records[resource] = record

    def recall(self, resource: str) -> str | None:
        return self.records.get(resource)

    def touch(self, resource: str) -> None:
        import time

        self.used[resource] = time.time()

    def last_used(self, resource: str) -> float | None:
        return self.used.get(resource)

    def forget(self, resource: str) -> None:
        self.used.pop(resource, None)
        self.records.pop(resource, None)
