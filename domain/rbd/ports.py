"""What the RBD backend needs from the runtime, as protocols: the temporary names a holder is
about to create (`Temporaries`) and the images imported into Ceph clusters (`ImportedImages`);
worker.stores.redis_rbd keeps both in Redis, tests/fakes.temporaries in memory.
"""

from __future__ import annotations

from typing import Protocol


class Temporaries(Protocol):
    """Names a holder is about to create under a temporary name (an RBD image being imported or
    cloned), recorded before it creates them, so that the next holder of the resource's lease
    can remove what a holder that died left, without listing a whole pool
    (worker.stores.redis_rbd.RedisTemporaries)."""

    def add(self, resource: str, name: str) -> None: ...

    def discard(self, resource: str, name: str) -> None: ...

    def members(self, resource: str) -> list[str]: ...


class ImportedImages(Protocol):
    """The images imported into Ceph clusters, by `<fsid>/<pool>/<image>`: each one's record
    (what its `imgprep.record` image-meta says, so that a prepare finds it without asking the
    cluster) and when it was last used (a prepare asked for it, one of its clones was removed),
    which aging measures the unused window from (worker.stores.redis_rbd.RedisImportedImages)."""

    def remember(self, resource: str, record: str) -> None: ...

    def recall(self, resource: str) -> str | None: ...

    def touch(self, resource: str) -> None: ...

    def last_used(self, resource: str) -> float | None: ...

    def forget(self, resource: str) -> None:
        """Drop the record and the last use (the image is gone)."""
        ...
