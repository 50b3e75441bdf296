"""References to cached bases in Redis: one hash per cache entry, holder → when recorded.

`imgprep:refs:<key>` has no expiry on purpose: a reference lives as long as its disk. The cache
manager drops references that went stale (their disk or canvas is gone). In host scope each
host's cache has its own references: `imgprep:refs:<host>/<key>` (the namespace `<host>/`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisError

from domain.core.errors import CoordinationUnavailable
from worker.stores.lua import script
from worker.stores.replies import text

REFS_PREFIX = "imgprep:refs:"
EVICTING_PREFIX = "imgprep:evicting:"

_ADD_UNLESS_EVICTING = script("worker.stores", "references_add.lua")

_BEGIN_EVICTION = script("worker.stores", "references_begin_eviction.lua")


class RedisReferences:
    """A `domain.cache.ports.References` in Redis."""

    def __init__(self, client: redis.Redis, namespace: str = "") -> None:
        self.client = client
        self.namespace = namespace
        self._add_unless_evicting = client.register_script(_ADD_UNLESS_EVICTING)
        self._begin_eviction = client.register_script(_BEGIN_EVICTION)

    def key(self, cache_key: str) -> str:
        return REFS_PREFIX + self.namespace + cache_key

    def add(self, key: str, holder: str) -> None:
        self._call(self.client.hset, self.key(key), holder, repr(time.time()))

    def discard(self, key: str, holder: str) -> None:
        self._call(self.client.hdel, self.key(key), holder)

    def add_unless_evicting(self, key: str, holder: str) -> bool:
        return bool(
            self._call(
                self._add_unless_evicting,
                keys=[self.key(key), EVICTING_PREFIX + self.namespace + key],
                args=[holder, repr(time.time())],
            )
        )

    def begin_eviction(self, key: str, lease_seconds: float) -> bool:
        return bool(
            self._call(
                self._begin_eviction,
                keys=[self.key(key), EVICTING_PREFIX + self.namespace + key],
                args=[max(1, int(lease_seconds * 1000))],
            )
        )

    def end_eviction(self, key: str) -> None:
        self._call(self.client.delete, EVICTING_PREFIX + self.namespace + key)

    def holders(self, key: str) -> dict[str, float]:
        raw = self._call(self.client.hgetall, self.key(key))
        return {text(name): float(text(value)) for name, value in raw.items()}

    def forget(self, holder: str) -> list[str]:
        released = []
        for redis_key in self._keys():
            if self._call(self.client.hdel, redis_key, holder):
                released.append(text(redis_key).removeprefix(REFS_PREFIX + self.namespace))
        return sorted(released)

    def counts(self) -> dict[str, int]:
        """Number of holders of every referenced key."""
        counts = {}
        for redis_key in self._keys():
            counts[text(redis_key).removeprefix(REFS_PREFIX + self.namespace)] = int(
                self._call(self.client.hlen, redis_key)
            )
        return counts

    def _keys(self) -> list[bytes | str]:
        return list(self._call(lambda: list(self.client.scan_iter(self.key("*"), count=500))))

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except RedisError as error:
            raise CoordinationUnavailable(f"Redis unavailable for references: {error}") from None
