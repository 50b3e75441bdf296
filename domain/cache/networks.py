"""Where an image download may connect: every address it uses is checked as it connects.

A URL in a request must not reach the worker's own services (Redis, Flower, metrics on
loopback) or the cloud's metadata service (169.254.169.254), whose answer would be cached as an
image and handed to a guest. So the check is not on the URL but on the socket: the host name is
resolved once, each resolved address is checked against `fetch.denied_networks` and only an
allowed one is connected to, by number. A name that resolves differently a second time (DNS
rebinding) gains nothing, and every redirect hop opens its connection the same way. Addresses
that embed an IPv4 address (IPv4-mapped, 6to4, NAT64) are checked as that address too.

Peers (host scope, domain.cache.peer_client) are connected to the same way, with a list of
allowed networks as well: an address is used only when it is in `peer.allowed_networks` and
outside `NEVER_PEER_NETWORKS` (link-local, where cloud metadata services answer, unspecified and
multicast), whatever `peer.allowed_networks` says.

`ConnectionGuard` also remembers the connections it made, so the download can be stopped from
another thread (`abort`): a blocked read returns once its socket is shut down.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family

from domain.core.errors import SourceNotAllowed

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Loopback, link-local (cloud metadata services), unspecified ("this host") and multicast.
DEFAULT_DENIED_NETWORKS: tuple[str, ...] = (
    "127.0.0.0/8",
    "::1/128",
    "169.254.0.0/16",
    "fe80::/10",
    "0.0.0.0/8",
    "::/128",
    "224.0.0.0/4",
    "ff00::/8",
)
LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
# Where no peer is ever reached, and no peer request is ever answered from: the networks of the
# default denied list that hold metadata services or no host at all (all but loopback).
NEVER_PEER_NETWORKS: tuple[str, ...] = tuple(
    n for n in DEFAULT_DENIED_NETWORKS if n not in LOOPBACK_NETWORKS
)
# Where peers are by default: the private networks (RFC 1918, IPv6 unique local addresses) a
# fleet's hosts talk to each other on. Loopback only where a fleet runs on one machine (tests).
DEFAULT_PEER_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def loopback_allowed(also_denied: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The default denied networks without loopback, plus `also_denied`: for the demo, the
    tests and the benchmarks, which serve images on this host."""
    kept = tuple(n for n in DEFAULT_DENIED_NETWORKS if n not in LOOPBACK_NETWORKS)
    return kept + also_denied


def in_networks(address: Address, networks: tuple[Network, ...]) -> Network | None:
    """The first of `networks` that holds `address` (or the IPv4 address an IPv4-mapped IPv6
    address is), if any: an allow-list's test (6to4 and NAT64 name other hosts)."""
    candidates: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    for candidate in candidates:
        for network in networks:
            if candidate.version == network.version and candidate in network:
                return network
    return None


def embedded_addresses(address: Address) -> list[Address]:
    """`address` and the IPv4 address it stands for, if it embeds one."""
    found: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        for inner in (address.ipv4_mapped, address.sixtofour):
            if inner is not None:
                found.append(inner)
        if address in _NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


class ConnectionGuard:
    """Connects a download's sockets to allowed addresses only, and can abort them all.

    An address is refused when it (or the IPv4 address it embeds) is in a `denied` network, or,
    with `allowed`, when it is in none of those; `refusal` says to whom (it names the setting).
    """

    def __init__(
        self,
        denied: tuple[Network, ...],
        *,
        allowed: tuple[Network, ...] | None = None,
        refusal: str = "a network images may not come from (fetch.denied_networks)",
    ) -> None:
        self.denied = denied
        self.allowed = allowed
        self.refusal = refusal
        self._lock = threading.Lock()
        self._connections: list[HTTPConnection] = []
        self._aborted = False

    def denies(self, address: Address) -> Network | None:
        """The denied network `address` (or the IPv4 address it embeds) is in, if any."""
        for candidate in embedded_addresses(address):
            for network in self.denied:
                if candidate.version == network.version and candidate in network:
                    return network
        return None

    def refuses(self, address: Address) -> str | None:
        """Why `address` may not be connected to, or None."""
        network = self.denies(address)
        if network is not None:
            return f"in {network}"
        if self.allowed is not None and in_networks(address, self.allowed) is None:
            return "in none of the allowed networks"
        return None

    def connect(
        self,
        host: str,
        port: int,
        timeout: float | None,
        *,
        source_address: tuple[str, int] | None = None,
        socket_options: list[tuple[int, int, int | bytes]] | None = None,
    ) -> socket.socket:
        """A socket connected to an allowed address of `host` (urllib3's create_connection,
        with each resolved address checked before anything is sent to it)."""
        refused: list[str] = []
        error: OSError | None = None
        host = host.strip("[]")
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            host, port, allowed_gai_family(), socket.SOCK_STREAM
        ):
            address = ipaddress.ip_address(str(sockaddr[0]))
            reason = self.refuses(address)
            if reason is not None:
                refused.append(f"{address} ({reason})")
                continue
            sock = socket.socket(family, kind, proto)
            try:
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as failed:
                sock.close()
                error = failed
                continue
            return sock
        if error is not None:
            raise error
        if refused:
            raise SourceNotAllowed(
                f"{host} resolves to {', '.join(refused)}, {self.refusal}; nothing was sent to it"
            )
        raise OSError(f"{host} resolves to no address")

    def opened(self, connection: HTTPConnection, sock: socket.socket) -> None:
        """Remember `connection`, whose new socket is `sock`, for `abort`."""
        with self._lock:
            aborted = self._aborted
            self._connections.append(connection)
        if aborted:
            _shutdown(sock)

    def abort(self) -> None:
        """Shut down every connection made so far or later: blocked reads return at once."""
        with self._lock:
            self._aborted = True
            connections = list(self._connections)
        for connection in connections:
            if connection.sock is not None:
                _shutdown(connection.sock)


def _shutdown(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for a TLS socket: SSLSocket.shutdown would drop its
    # TLS state under the thread that is reading. OSError: closed meanwhile.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Guarded(HTTPConnection):
    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        try:
            sock = self._guard.connect(
                self._dns_host,
                self.port,
                timeout,
                source_address=self.source_address,
                socket_options=self.socket_options,
            )
        except socket.gaierror as error:
            raise NameResolutionError(self.host, self, error) from error
        except TimeoutError as error:
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from error
        except OSError as error:
            raise NewConnectionError(
                self, f"Failed to establish a new connection: {error}"
            ) from error
        self._guard.opened(self, sock)
        return sock


class GuardedHTTPConnection(_Guarded):
    pass


class GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    pass


class GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class GuardedPoolManager(urllib3.PoolManager):
    """A PoolManager whose every connection goes through `guard`."""

    def __init__(self, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_classes_by_scheme = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}
        self.guard = guard

    def _new_pool(
        self,
        scheme: str,
        host: str,
        port: int,
        request_context: dict[str, Any] | None = None,
    ) -> HTTPConnectionPool:
        context = dict(self.connection_pool_kw if request_context is None else request_context)
        context["guard"] = self.guard
        return super()._new_pool(scheme, host, port, context)
