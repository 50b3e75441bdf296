"""In-memory peer registry (the PeerRegistry port)."""

from __future__ import annotations

import dataclasses

from domain.cache.peers import ImageDigests, PeerCopy


class InMemoryPeerRegistry:
    """Copies of each cache key by host, the size last recorded for each host's transfer, and
    the digests recorded for it (as the Redis adapter keeps them, without the signatures)."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, PeerCopy]] = {}
        self.sizes: dict[str, dict[str, tuple[int, int]]] = {}  # key → host → (fence, size)
        self.recorded: dict[str, ImageDigests] = {}

    def copies(self, key: str) -> list[PeerCopy]:
        return [self._sized(key, copy) for copy in self.held.get(key, {}).values()]

    def copy(self, key: str, host: str) -> PeerCopy | None:
        copy = self.held.get(key, {}).get(host)
        return None if copy is None else self._sized(key, copy)

    def announce(self, key: str, copy: PeerCopy) -> None:
        self.held.setdefault(key, {})[copy.host] = copy
        self.sizes.setdefault(key, {})[copy.host] = (copy.fence, copy.size)

    def progress(self, key: str, host: str, fence: int, size: int) -> None:
        self.sizes.setdefault(key, {})[host] = (fence, size)

    def withdraw(self, key: str, host: str) -> None:
        self.held.get(key, {}).pop(host, None)
        self.sizes.get(key, {}).pop(host, None)

    def digests(self, key: str) -> ImageDigests | None:
        return self.recorded.get(key)

    def record_digests(self, key: str, digests: ImageDigests) -> None:
        self.recorded[key] = digests

    def _sized(self, key: str, copy: PeerCopy) -> PeerCopy:
        """The copy with the size last recorded for its transfer (its own without one)."""
        fence, size = self.sizes.get(key, {}).get(copy.host, (copy.fence, copy.size))
        return dataclasses.replace(copy, size=size) if fence == copy.fence else copy
