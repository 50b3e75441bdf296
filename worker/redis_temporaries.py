"""Temporary RBD image names in Redis (the Temporaries port): one set per resource,
`imgprep:temporaries:<fsid>/<pool>/<image>`, written before a holder creates the name and read by
the next holder of the resource's lease, which removes what a dead holder left."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import RedisError

from domain.core.errors import CoordinationUnavailable

PREFIX = "imgprep:temporaries:"
USAGE_KEY = "imgprep:rbd:last-used"  # one hash: `<fsid>/<pool>/<image>` -> epoch seconds
T = TypeVar("T")


class RedisTemporaries:
    """A `domain.core.ports.Temporaries` in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def add(self, resource: str, name: str) -> None:
        self._call(lambda: self.client.sadd(PREFIX + resource, name))

    def discard(self, resource: str, name: str) -> None:
        self._call(lambda: self.client.srem(PREFIX + resource, name))

    def members(self, resource: str) -> list[str]:
        found = self._call(lambda: self.client.smembers(PREFIX + resource))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in found)

    @staticmethod
    def _call(action: Callable[[], T]) -> T:
        try:
            return action()
        except RedisError as error:
            raise CoordinationUnavailable(f"Redis unavailable for temporaries: {error}") from None


class RedisImageUsage:
    """A `domain.core.ports.ImageUsage` in Redis: one hash for every cluster, in Redis's clock
    (worker clocks may differ)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def touch(self, resource: str) -> None:
        def now() -> object:
            seconds, micros = self.client.time()
            return self.client.hset(USAGE_KEY, resource, f"{seconds + micros / 1e6:.3f}")

        RedisTemporaries._call(now)

    def last_used(self, resource: str) -> float | None:
        found = RedisTemporaries._call(lambda: self.client.hget(USAGE_KEY, resource))
        return float(found) if found is not None else None

    def forget(self, resource: str) -> None:
        RedisTemporaries._call(lambda: self.client.hdel(USAGE_KEY, resource))
