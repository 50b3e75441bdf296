"""The peer registry (domain.core.ports.PeerRegistry) in Redis, for host scope.

Per cache key: `imgprep:peers:<key>` (hash: host → its copy as JSON, without its size),
`imgprep:peers:<key>:size` (hash: host → bytes on disk, updated as a download writes) and
`imgprep:peers:<key>:digests` (the digests the verifying hosts recorded, JSON). Every key
expires `keep_seconds` after the last announcement (each fetch on a host announces its copy
again), so a host that went away is forgotten.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisError

from domain.core.errors import CoordinationUnavailable
from domain.core.peers import ImageDigests, PeerCopy

PEERS_PREFIX = "imgprep:peers:"


class RedisPeerRegistry:
    """A `domain.core.ports.PeerRegistry` in Redis."""

    def __init__(self, client: redis.Redis, keep_seconds: float) -> None:
        self.client = client
        self.keep_seconds = max(1, int(keep_seconds))

    def copies(self, key: str) -> list[PeerCopy]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(PEERS_PREFIX + key)
        pipe.hgetall(PEERS_PREFIX + key + ":size")
        described, sizes = self._call(pipe.execute)
        return [_copy(raw, sizes.get(host)) for host, raw in described.items()]

    def copy(self, key: str, host: str) -> PeerCopy | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(PEERS_PREFIX + key, host)
        pipe.hget(PEERS_PREFIX + key + ":size", host)
        raw, size = self._call(pipe.execute)
        return None if raw is None else _copy(raw, size)

    def announce(self, key: str, copy: PeerCopy) -> None:
        described = dataclasses.asdict(copy)
        size = described.pop("size")
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(PEERS_PREFIX + key, copy.host, json.dumps(described))
        pipe.hset(PEERS_PREFIX + key + ":size", copy.host, size)
        pipe.expire(PEERS_PREFIX + key, self.keep_seconds)
        pipe.expire(PEERS_PREFIX + key + ":size", self.keep_seconds)
        self._call(pipe.execute)

    def progress(self, key: str, host: str, size: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(PEERS_PREFIX + key + ":size", host, size)
        pipe.expire(PEERS_PREFIX + key + ":size", self.keep_seconds)
        self._call(pipe.execute)

    def withdraw(self, key: str, host: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(PEERS_PREFIX + key, host)
        pipe.hdel(PEERS_PREFIX + key + ":size", host)
        self._call(pipe.execute)

    def digests(self, key: str) -> ImageDigests | None:
        raw = self._call(self.client.get, PEERS_PREFIX + key + ":digests")
        return None if raw is None else ImageDigests(**json.loads(raw))

    def record_digests(self, key: str, digests: ImageDigests) -> None:
        self._call(
            self.client.set,
            PEERS_PREFIX + key + ":digests",
            json.dumps(dataclasses.asdict(digests)),
            ex=self.keep_seconds,
        )

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except RedisError as error:
            raise CoordinationUnavailable(
                f"Redis unavailable for the peer registry: {error}"
            ) from None


def _copy(raw: bytes | str, size: bytes | str | None) -> PeerCopy:
    described = json.loads(raw)
    return PeerCopy(**described, size=int(size) if size is not None else 0)
