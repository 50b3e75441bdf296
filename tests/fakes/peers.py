"""In-memory peer registry (the PeerRegistry port)."""

from __future__ import annotations

import dataclasses

from domain.core.peers import ImageDigests, PeerCopy


class InMemoryPeerRegistry:
    """Copies of each cache key by host, and the digests recorded for it."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, PeerCopy]] = {}
        self.recorded: dict[str, ImageDigests] = {}

    def copies(self, key: str) -> list[PeerCopy]:
        return list(self.held.get(key, {}).values())

    def copy(self, key: str, host: str) -> PeerCopy | None:
        return self.held.get(key, {}).get(host)

    def announce(self, key: str, copy: PeerCopy) -> None:
        self.held.setdefault(key, {})[copy.host] = copy

    def progress(self, key: str, host: str, size: int) -> None:
        current = self.copy(key, host)
        if current is not None:
            self.held[key][host] = dataclasses.replace(current, size=size)

    def withdraw(self, key: str, host: str) -> None:
        self.held.get(key, {}).pop(host, None)

    def digests(self, key: str) -> ImageDigests | None:
        return self.recorded.get(key)

    def record_digests(self, key: str, digests: ImageDigests) -> None:
        self.recorded[key] = digests
