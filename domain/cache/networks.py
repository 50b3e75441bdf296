"""Where an image download may connect: every address it uses is checked as it connects.

A URL in a request must not reach the worker's own services (Redis, Flower, metrics on
loopback) or the cloud's metadata service (169.254.169.254), whose answer would be cached as an
image and handed to a guest. So the check is not on the URL but on the socket: the host name is
resolved once, each resolved address is checked against `fetch.denied_networks` and only an
allowed one is connected to, by number. A name that resolves differently a second time (DNS
rebinding) gains nothing, and every redirect hop opens its connection the same way. Addresses
that embed an IPv4 address (IPv4-mapped, 6to4, NAT64) are checked as that address too.

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
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def loopback_allowed(also_denied: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The default denied networks without loopback, plus `also_denied`: for the demo, the
    tests and the benchmarks, which serve images on this host."""
    kept = tuple(n for n in DEFAULT_DENIED_NETWORKS if n not in LOOPBACK_NETWORKS)
    return kept + also_denied


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
    """Connects a download's sockets to allowed addresses only, and can abort them all."""

    def __init__(self, denied: tuple[Network, ...]) -> None:
        self.denied = denied
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
            network = self.denies(address)
            if network is not None:
                refused.append(f"{address} (in {network})")
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
                f"{host} resolves to {', '.join(refused)}, a network images may not come from "
                "(fetch.denied_networks); nothing was sent to it"
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
