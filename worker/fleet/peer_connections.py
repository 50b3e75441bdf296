"""Which connections the peer server (worker.fleet.peer_server) takes, and for how long it waits on
them before they are authenticated.

`AdmittingServer` decides in its accepting thread, before any thread is started for a
connection: a client outside `peer.allowed_networks` (or on a network no peer is ever on:
link-local, unspecified, multicast) is closed at once, as is a connection beyond
`peer.max_unauthenticated_connections` still unauthenticated. An admitted connection counts as
unauthenticated until its handler calls `authenticated`, or it ends. Its request line and
headers are read through a `DeadlineReader`: at most `MAX_REQUEST_BYTES`, all of them within
`peer.header_timeout_seconds` (a deadline for the whole request, not a timeout per read, so a
client sending a byte a second cannot keep a thread).
"""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

import structlog

from domain.cache.networks import NEVER_PEER_NETWORKS, Network, in_networks
from worker.settings import PeerSettings

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES = 16 * 2**10  # request line and headers (ours are a few hundred bytes)
NEVER = tuple(ipaddress.ip_network(network) for network in NEVER_PEER_NETWORKS)


class RequestTooLong(OSError):
    """The request line and headers are longer than any peer's."""


class DeadlineReader(io.RawIOBase):
    """A socket's bytes for the request line and headers: every read waits at most until
    `deadline`, and no more than `limit` bytes are read in all."""

    def __init__(self, sock: socket.socket, deadline: float, limit: int) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline
        self.left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received in time")
        if self.left <= 0:
            raise RequestTooLong(f"request longer than {MAX_REQUEST_BYTES} bytes")
        self.sock.settimeout(remaining)
        count = self.sock.recv_into(memoryview(buffer)[: self.left])
        self.left -= count
        return count


class AdmittingServer(ThreadingHTTPServer):
    """A threaded HTTP server that admits connections as `peer` settings say (module doc)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a burst of connections waits to be accepted, not refused

    def __init__(self, address: tuple[str, int], handler: Any, settings: PeerSettings) -> None:
        self.allowed: tuple[Network, ...] = tuple(settings.allowed_networks)
        self.max_unauthenticated = settings.max_unauthenticated_connections
        self.header_timeout = settings.header_timeout_seconds
        self._unauthenticated: set[object] = set()
        self._lock = threading.Lock()
        self._refused = 0
        self._refused_logged = 0.0
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a new connection, in the accepting thread: from an allowed network, and while
        fewer than the maximum are unauthenticated (else it is closed, no thread started)."""
        try:
            address = ipaddress.ip_address(str(client_address[0]).split("%", 1)[0])
        except ValueError:
            return self._refuse(client_address, "not an IP address")
        if in_networks(address, NEVER) is not None or in_networks(address, self.allowed) is None:
            return self._refuse(client_address, "not in peer.allowed_networks")
        with self._lock:
            if len(self._unauthenticated) >= self.max_unauthenticated:
                full = True
            else:
                self._unauthenticated.add(request)
                full = False
        if full:
            return self._refuse(client_address, "peer.max_unauthenticated_connections reached")
        return True

    def request_reader(self, sock: socket.socket) -> io.BufferedReader:
        """What a handler reads a new connection's request from: within the deadline, capped."""
        deadline = time.monotonic() + self.header_timeout
        return io.BufferedReader(DeadlineReader(sock, deadline, MAX_REQUEST_BYTES))

    def authenticated(self, request: object) -> None:
        """The request on this connection is authentic: it no longer counts as unauthenticated."""
        with self._lock:
            self._unauthenticated.discard(request)

    def shutdown_request(self, request: Any) -> None:
        self.authenticated(request)  # whatever ended it, it no longer waits
        super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        log.info("peer_request_broke_off", client=str(client_address))

    def _refuse(self, client_address: Any, reason: str) -> bool:
        """False, logged at most once a second (with how many were refused since)."""
        now = time.monotonic()
        with self._lock:
            self._refused += 1
            if now - self._refused_logged < 1.0:
                return False
            refused, self._refused, self._refused_logged = self._refused, 0, now
        log.warning(
            "peer_connection_refused", client=str(client_address[0]), reason=reason, count=refused
        )
        return False
