"""What the fleet knows about copies of a cache entry on other hosts (host scope).

Each host that holds an image, or is fetching it, records a `PeerCopy` in the peer registry
(domain.cache.ports.PeerRegistry): where its peer server is, whether its copy is complete, how
many bytes of it are on disk, and which host it streams from. `ImageDigests` are what the host
that verified the origin's bytes recorded, so a host that takes the image from a peer can check
it against them: a peer is never trusted more than the origin.

Content kinds. A copy in progress holds the bytes as the origin serves them (`source`); a
complete copy is the published cache entry (`entry`), which differs from the source when it was
converted to raw. Where no conversion happened both are the same bytes, and a transfer may move
between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Content = Literal["source", "entry"]
ORIGIN = "origin"  # the upstream of a copy downloaded from the image's source


@dataclass(frozen=True)
class PeerCopy:
    """One host's copy of a cache entry, as it announced it."""

    host: str
    url: str  # base URL of the host's peer server
    content: Content
    complete: bool
    size: int  # bytes on disk, from the first (all of them once complete)
    total: int | None = None  # the full size, when known
    fence: int = 0  # names the temporary being written (`<key>.part.<fence>`) while in progress
    upstream: str = ""  # the host it streams from, ORIGIN, or "" for a complete copy


@dataclass(frozen=True)
class ImageDigests:
    """Digests recorded by the hosts that verified an image: the source's bytes (by whoever
    downloaded them from the origin), and the published entry's (after conversion)."""

    source_sha256: str
    source_size: int
    entry_sha256: str | None = None
    entry_size: int | None = None
    entry_format: str | None = None
    source_format: str | None = None

    def same_bytes(self) -> bool:
        """Whether the entry is the source as it was served (no conversion)."""
        return self.entry_sha256 == self.source_sha256


def compatible(have: Content | None, offered: Content, digests: ImageDigests | None) -> bool:
    """Whether bytes of kind `offered` continue a transfer of kind `have` (None: nothing yet)."""
    if have is None or have == offered:
        return True
    return digests is not None and digests.same_bytes()
