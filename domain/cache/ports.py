"""What the image cache needs from the runtime, as protocols: references to cached bases
(`References`; worker.stores.redis_references) and, in host scope, the copies of cache entries
on peers (`PeerRegistry`; worker.stores.redis_peers). tests/fakes holds the in-memory ones.
"""

from __future__ import annotations

from typing import Protocol

from domain.cache.peers import ImageDigests, PeerCopy


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


class PeerRegistry(Protocol):
    """Which hosts hold (or are fetching) each cache entry, and the digests it is verified
    against (host scope; worker.stores.redis_peers.RedisPeerRegistry)."""

    def copies(self, key: str) -> list[PeerCopy]:
        """Every host's copy of `key`, complete or in progress."""
        ...

    def copy(self, key: str, host: str) -> PeerCopy | None: ...

    def announce(self, key: str, copy: PeerCopy) -> None:
        """Record `copy` (replacing the host's previous one)."""
        ...

    def progress(self, key: str, host: str, fence: int, size: int) -> None:
        """The host's copy in progress (the one with `fence`) now has `size` bytes on disk."""
        ...

    def withdraw(self, key: str, host: str) -> None: ...

    def digests(self, key: str) -> ImageDigests | None: ...

    def record_digests(self, key: str, digests: ImageDigests) -> None:
        """Record what a verifying host found (replacing what was there)."""
        ...
