"""The rbd backend's Redis adapters, resources named `<fsid>/<pool>/<image>`:

* Temporaries: one set per resource, `imgprep:temporaries:<resource>`, written before a holder
  creates a temporary name and read by the next holder of the resource's lease, which removes
  what a dead holder left;
* ImportedImages: the record of each imported image (`imgprep:rbd:images`, what its image-meta
  says) and its last use (`imgprep:rbd:last-used`, in Redis's clock), one hash each for every
  cluster; they live as long as the images, and aging removes them with the image."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import RedisError

from domain.core.errors import CoordinationUnavailable

PREFIX = "imgprep:temporaries:"
USAGE_KEY = "imgprep:rbd:last-used"  # one hash: resource -> epoch seconds
RECORDS_KEY = "imgprep:rbd:images"  # one hash: resource -> the image's record (JSON)
T = TypeVar("T")


class RedisTemporaries:
    """A `domain.rbd.ports.Temporaries` in Redis."""

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


class RedisImportedImages:
    """A `domain.rbd.ports.ImportedImages` in Redis (last uses in Redis's clock: worker clocks
    may differ)."""

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

    def remember(self, resource: str, record: str) -> None:
        RedisTemporaries._call(lambda: self.client.hset(RECORDS_KEY, resource, record))

    def recall(self, resource: str) -> str | None:
        found = RedisTemporaries._call(lambda: self.client.hget(RECORDS_KEY, resource))
        if found is None:
            return None
        return found.decode() if isinstance(found, bytes) else str(found)

    def forget(self, resource: str) -> None:
        def both() -> object:
            with self.client.pipeline() as pipe:
                pipe.hdel(RECORDS_KEY, resource)
                pipe.hdel(USAGE_KEY, resource)
                return pipe.execute()

        RedisTemporaries._call(both)
