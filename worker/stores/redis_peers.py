"""The peer registry (domain.cache.ports.PeerRegistry) in Redis, for host scope.

Per cache key: `imgprep:peers:v2:<key>` (hash: host → its copy), `imgprep:peers:v2:<key>:size`
(hash: host → the bytes on disk of that copy, updated as a download writes) and
`imgprep:peers:v2:<key>:digests` (the digests the verifying hosts recorded). Every value is JSON
sealed with `peer.secret` (domain.cache.peer_records: signed, bound to its key and host, fresh);
one that is not is read as absent, so a Redis writer without the secret cannot point a host at a
peer, stretch a copy's size or vouch for bytes. Every key expires `keep_seconds` after the last
announcement (each fetch on a host announces its copy again), so a host that went away is
forgotten.

The previous version kept unsigned records under `imgprep:peers:<key>`: they are never read
(absent, as any unsigned record would be), and that version never reads these, whose extra
fields it could not parse; hosts of the two versions, side by side during an upgrade, each take
images from their own kind or from the origin.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog
from redis.exceptions import RedisError

from domain.cache.peer_records import RecordSeal, UntrustedRecord
from domain.cache.peers import ImageDigests, PeerCopy
from domain.core.errors import CoordinationUnavailable
from worker.stores.replies import text

log = structlog.get_logger(__name__)

PEERS_PREFIX = "imgprep:peers:v2:"
COPY, SIZE, DIGESTS = "copy", "size", "digests"
_LOGGED_EVERY_SECONDS = 60.0
_logged: dict[tuple[str, str, str, str], float] = {}  # (kind, key, host, reason) → when


class RedisPeerRegistry:
    """A `domain.cache.ports.PeerRegistry` in Redis, its records sealed with `secret`."""

    def __init__(self, client: redis.Redis, keep_seconds: float, secret: str) -> None:
        self.client = client
        self.keep_seconds = max(1, int(keep_seconds))
        self.seal = RecordSeal(secret, max_age_seconds=self.keep_seconds)

    def copies(self, key: str) -> list[PeerCopy]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(PEERS_PREFIX + key)
        pipe.hgetall(PEERS_PREFIX + key + ":size")
        described, sizes = self._call(pipe.execute)
        found = (
            self._copy(key, text(host, "replace"), raw, sizes.get(host))
            for host, raw in described.items()
        )
        return [copy for copy in found if copy is not None]

    def copy(self, key: str, host: str) -> PeerCopy | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(PEERS_PREFIX + key, host)
        pipe.hget(PEERS_PREFIX + key + ":size", host)
        raw, size = self._call(pipe.execute)
        return None if raw is None else self._copy(key, host, raw, size)

    def announce(self, key: str, copy: PeerCopy) -> None:
        described = self.seal.seal(COPY, (key, copy.host), dataclasses.asdict(copy))
        size = self._sealed_size(key, copy.host, copy.fence, copy.size)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(PEERS_PREFIX + key, copy.host, described)
        pipe.hset(PEERS_PREFIX + key + ":size", copy.host, size)
        pipe.expire(PEERS_PREFIX + key, self.keep_seconds)
        pipe.expire(PEERS_PREFIX + key + ":size", self.keep_seconds)
        self._call(pipe.execute)

    def progress(self, key: str, host: str, fence: int, size: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(PEERS_PREFIX + key + ":size", host, self._sealed_size(key, host, fence, size))
        pipe.expire(PEERS_PREFIX + key + ":size", self.keep_seconds)
        self._call(pipe.execute)

    def withdraw(self, key: str, host: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(PEERS_PREFIX + key, host)
        pipe.hdel(PEERS_PREFIX + key + ":size", host)
        self._call(pipe.execute)

    def digests(self, key: str) -> ImageDigests | None:
        raw = self._call(self.client.get, PEERS_PREFIX + key + ":digests")
        if raw is None:
            return None
        try:
            return ImageDigests(**self.seal.unseal(DIGESTS, (key,), raw))
        except (UntrustedRecord, TypeError) as error:
            _untrusted(DIGESTS, key, "", error)
            return None

    def record_digests(self, key: str, digests: ImageDigests) -> None:
        self._call(
            self.client.set,
            PEERS_PREFIX + key + ":digests",
            self.seal.seal(DIGESTS, (key,), dataclasses.asdict(digests)),
            ex=self.keep_seconds,
        )

    def _copy(
        self, key: str, host: str, raw: bytes | str, size: bytes | str | None
    ) -> PeerCopy | None:
        """The host's copy as it signed it, with the size it last signed for that copy (its
        announced size without one); None when the copy's record is not trusted."""
        try:
            fields = self.seal.unseal(COPY, (key, host), raw)
            copy = PeerCopy(**fields)
        except (UntrustedRecord, TypeError) as error:
            _untrusted(COPY, key, host, error)
            return None
        if copy.host != host:
            _untrusted(COPY, key, host, UntrustedRecord(f"names host {copy.host!r}"))
            return None
        if size is None:
            return copy
        try:
            grown = self.seal.unseal(SIZE, (key, host), size)
        except UntrustedRecord as error:
            _untrusted(SIZE, key, host, error)
            return copy
        if grown.get("fence") != copy.fence or type(grown.get("size")) is not int:
            return copy  # a size of another transfer of this host's: not this copy's
        return dataclasses.replace(copy, size=grown["size"])

    def _sealed_size(self, key: str, host: str, fence: int, size: int) -> str:
        return self.seal.seal(SIZE, (key, host), {"fence": fence, "size": size})

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except RedisError as error:
            raise CoordinationUnavailable(
                f"Redis unavailable for the peer registry: {error}"
            ) from None


def _untrusted(kind: str, key: str, host: str, error: Exception) -> None:
    """Log a record read as absent, once a minute per record and reason (readers poll)."""
    reason = str(error) if isinstance(error, UntrustedRecord) else "malformed fields"
    now = time.monotonic()
    seen = (kind, key, host, reason)
    if now - _logged.get(seen, -_LOGGED_EVERY_SECONDS) < _LOGGED_EVERY_SECONDS:
        return
    if len(_logged) > 4096:
        _logged.clear()
    _logged[seen] = now
    log.warning("peer_record_untrusted", record=kind, key=key, host=host, reason=reason)
