"""Reading a byte range of a cache entry from a peer's server (worker.fleet.peer_server),
signed with the fleet's secret (domain.cache.peer_auth).

Peers are addressed by what the peer registry says (records signed by fleet hosts), not by a
caller's URL, and are never trusted more than the origin: whatever they send is verified by
domain.cache.fleet against the request's checksum or the recorded digest. A peer's address is
connected to only when it is in `peer.allowed_networks` and outside the networks no peer is ever
at (domain.cache.networks: resolved once, each address checked, connected to by number). Every
failure is a `PeerFailed`, which drops that peer from the transfer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

import urllib3
from urllib3.exceptions import HTTPError

from domain.cache.networks import (
    NEVER_PEER_NETWORKS,
    ConnectionGuard,
    GuardedPoolManager,
    Network,
)
from domain.cache.peer_auth import signed_headers
from domain.cache.peers import PeerCopy
from domain.core.errors import SourceNotAllowed

CHUNK = 256 * 2**10
_NEVER = tuple(ipaddress.ip_network(network) for network in NEVER_PEER_NETWORKS)
REFUSAL = "an address no peer may be reached at (peer.allowed_networks)"


class PeerFailed(Exception):
    """A peer could not serve what was asked; `cooldown` seconds before it is asked again."""

    def __init__(
        self, message: str, cooldown: float, *, gone: bool = False, stalled_at: int | None = None
    ) -> None:
        super().__init__(message)
        self.cooldown = cooldown
        self.gone = gone  # the peer answered that it does not have it
        # the peer's recorded size when it stalled: it is asked again, cooldown or not, once its
        # record shows more (a slow peer, not a dead one: better than the origin)
        self.stalled_at = stalled_at


@dataclass(frozen=True)
class PeerOptions:
    """How this host talks to peers (worker.settings.PeerSettings)."""

    secret: str
    connect_timeout_seconds: float
    stall_seconds: float
    allowed_networks: tuple[Network, ...]


def peer_path(key: str, copy: PeerCopy) -> str:
    """The path of a copy on its peer's server: the entry, or the temporary of its holder."""
    return f"/v1/{key}" if copy.complete else f"/v1/{key}/part/{copy.fence}"


class PeerClient:
    """Range requests to peers over one connection pool."""

    def __init__(self, options: PeerOptions) -> None:
        self.options = options
        guard = ConnectionGuard(_NEVER, allowed=options.allowed_networks, refusal=REFUSAL)
        self.pool = GuardedPoolManager(
            guard,
            retries=False,
            timeout=urllib3.Timeout(
                connect=options.connect_timeout_seconds, read=options.stall_seconds
            ),
        )

    def read(self, key: str, copy: PeerCopy, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of `copy`, in chunks; PeerFailed when the peer does not serve
        exactly them."""
        path = peer_path(key, copy)
        byte_range = f"bytes={start}-{end - 1}"
        headers = signed_headers(self.options.secret, "GET", path, byte_range)
        try:
            response = self.pool.request(
                "GET",
                copy.url.rstrip("/") + path,
                headers=headers,
                preload_content=False,
                decode_content=False,
                redirect=False,
            )
        except HTTPError as error:
            raise PeerFailed(f"cannot reach peer {copy.host}: {error}", cooldown=2.0) from None
        except SourceNotAllowed as error:  # its address is not allowed: not asked again
            raise PeerFailed(f"peer {copy.host} refused: {error}", cooldown=float("inf")) from None
        try:
            self._check(response, copy, start)
            expected = int(response.headers.get("Content-Length", "-1"))
            if expected <= 0 or expected > end - start:
                raise PeerFailed(
                    f"peer {copy.host} announced {expected} bytes for {byte_range}", cooldown=1.0
                )
            got = 0
            while got < expected:
                data = response.read(min(CHUNK, expected - got), decode_content=False)
                if not data:
                    raise PeerFailed(
                        f"peer {copy.host} broke off after {got} of {expected} bytes",
                        cooldown=self.options.stall_seconds,
                    )
                got += len(data)
                yield data
        except HTTPError as error:
            raise PeerFailed(
                f"transfer from peer {copy.host} failed: {error}",
                cooldown=self.options.stall_seconds,
            ) from None
        finally:
            response.release_conn()

    def _check(self, response: urllib3.BaseHTTPResponse, copy: PeerCopy, start: int) -> None:
        status = response.status
        if status == 503:
            raise PeerFailed(f"peer {copy.host} is busy", cooldown=0.5)
        if status in (404, 416):
            raise PeerFailed(
                f"peer {copy.host} no longer has those bytes", cooldown=0.2, gone=status == 404
            )
        if status != 206:
            raise PeerFailed(
                f"peer {copy.host} answered HTTP {status}", cooldown=self.options.stall_seconds
            )
        spec = response.headers.get("Content-Range", "")
        if not spec.startswith(f"bytes {start}-"):
            raise PeerFailed(
                f"peer {copy.host} answered range {spec!r} for bytes from {start}", cooldown=1.0
            )

    def close(self) -> None:
        self.pool.clear()
