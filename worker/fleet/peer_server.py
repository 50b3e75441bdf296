"""Each host's cache, served read-only to its peers (host scope): a worker bootstep runs it in
the worker's main process.

    GET /v1/<key>                 the complete entry (its record describes the very file opened)
    GET /v1/<key>/part/<fence>    the temporary `<key>.part.<fence>` of the holder now fetching
                                  it, only while the registry records it as this host's copy in
                                  progress, and only within the bytes recorded as on disk

Nothing else is served: the path is built from a cache key (40 hex digits) and a fence number
under the cache directory, opened without following links. Every request is signed
(domain.cache.peer_auth: an HMAC of method, path, Range and a fresh timestamp with
`peer.secret`) and asks for a byte range; at most `peer.max_connections` transfers run at once
(503 beyond), and all of them together send at most `peer.max_bytes_per_second` (0: no limit).
A second worker on the same host finds the port taken and leaves serving to the first.

Before a request is authenticated it costs little and not for long (worker.fleet.peer_connections:
clients only from `peer.allowed_networks`, at most `peer.max_unauthenticated_connections` of
them, each with `peer.header_timeout_seconds` for its whole request). One request per
connection: after its response, the connection is closed. A client that takes less than 256 KiB
of a response in `peer.send_timeout_seconds` is cut off, and its transfer slot is free.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import structlog
from celery import bootsteps

from domain.cache.directory import ImageCache
from domain.cache.networks import in_networks
from domain.cache.peer_auth import SIGNATURE_HEADER, SIGNED_HEADERS, TIMESTAMP_HEADER, verify
from domain.cache.peers import PeerCopy
from worker.fleet.peer_connections import NEVER, AdmittingServer, RequestTooLong
from worker.http_serving import QuietHandler, ServedInThread
from worker.settings import PeerSettings, Settings, get_settings

log = structlog.get_logger(__name__)

_PATH = re.compile(r"/v1/([0-9a-f]{40})(?:/part/([0-9]{1,19}))?")
_RANGE = re.compile(r"bytes=([0-9]{1,19})-([0-9]{0,19})")
MAX_RESPONSE = 64 * 2**20
CHUNK = 256 * 2**10  # each must be taken by the client within peer.send_timeout_seconds


class Pacer:
    """Spaces out sends so that all of them together stay under `rate` bytes per second."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, count: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + count / self.rate
        if start > now:
            time.sleep(start - now)


class PeerServer:
    """The HTTP server of one host's cache. `copy_of(key)` is this host's copy of `key` as the
    peer registry records it (for temporaries in progress)."""

    def __init__(
        self,
        settings: PeerSettings,
        cache_dir: Path,
        copy_of: Any,
        *,
        bind: str | None = None,
    ) -> None:
        self.settings = settings
        self.cache = ImageCache(cache_dir)
        self.copy_of = copy_of
        self.pacer = Pacer(settings.max_bytes_per_second)
        self.slots = threading.BoundedSemaphore(settings.max_connections)
        self.served = 0  # bytes sent, for tests and logs
        # "": every address (noqa: S104), each client checked against peer.allowed_networks
        self._httpd = AdmittingServer((bind or "0.0.0.0", settings.port), self._handler(), settings)  # noqa: S104
        self._serving = ServedInThread(self._httpd, "imgprep-peer-server")

    @property
    def port(self) -> int:
        return self._serving.port

    def start(self) -> PeerServer:
        self._serving.start()
        return self

    def stop(self) -> None:
        self._serving.stop()

    def _open(self, key: str, fence: str | None) -> tuple[int, int, int | None] | None:
        """(fd, bytes that may be sent, total size) of what `key` (and `fence`) names, or None."""
        return self._open_entry(key) if fence is None else self._open_part(key, fence)

    def _open_entry(self, key: str) -> tuple[int, int, int | None] | None:
        record = self.cache.lookup(key)
        if record is None or record.file is None:
            return None
        fd = _open_file(self.cache.entry(key))
        if fd is None:
            return None
        stat = os.fstat(fd)
        if (stat.st_size, stat.st_ino) != (record.file.size, record.file.inode):
            os.close(fd)
            return None
        return fd, stat.st_size, stat.st_size

    def _open_part(self, key: str, fence: str) -> tuple[int, int, int | None] | None:
        copy: PeerCopy | None = self.copy_of(key)
        if copy is None or copy.complete or str(copy.fence) != fence:
            return None
        fd = _open_file(self.cache.entry(key).with_name(f"{key}.part.{fence}"))
        if fd is None:
            return None
        return fd, copy.size, copy.total

    def _handler(self) -> type[QuietHandler]:
        server = self

        class Handler(QuietHandler):
            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # read through a deadline instead
                self.rfile = server._httpd.request_reader(self.connection)

            def handle(self) -> None:
                """One request per connection."""
                try:
                    self.handle_one_request()
                except (TimeoutError, RequestTooLong) as error:
                    log.info(
                        "peer_request_not_received", client=self.client_address[0], error=str(error)
                    )

            def log_error(self, format: str, *args: object) -> None:
                log.info("peer_request_failed", client=self.client_address[0], error=format % args)

            def do_GET(self) -> None:
                self.close_connection = True
                path = self.path
                byte_range = self.headers.get("Range", "")
                repeated = [n for n in SIGNED_HEADERS if len(self.headers.get_all(n) or ()) > 1]
                refused = (
                    f"header {repeated[0]} given more than once"
                    if repeated
                    else verify(
                        server.settings.secret,
                        "GET",
                        path,
                        byte_range,
                        self.headers.get(TIMESTAMP_HEADER),
                        self.headers.get(SIGNATURE_HEADER),
                    )
                )
                if refused is not None:
                    log.warning("peer_request_refused", path=path[:200], reason=refused)
                    self._empty(HTTPStatus.UNAUTHORIZED)
                    return
                server._httpd.authenticated(self.request)
                self.connection.settimeout(server.settings.send_timeout_seconds)
                named = _PATH.fullmatch(path)
                wanted = _RANGE.fullmatch(byte_range)
                if named is None:
                    self._empty(HTTPStatus.NOT_FOUND)
                    return
                if wanted is None:
                    self._empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    return
                if not server.slots.acquire(blocking=False):
                    self._empty(HTTPStatus.SERVICE_UNAVAILABLE)
                    return
                try:
                    self._serve(named.group(1), named.group(2), wanted)
                finally:
                    server.slots.release()

            def _serve(self, key: str, fence: str | None, wanted: re.Match[str]) -> None:
                opened = server._open(key, fence)
                if opened is None:
                    self._empty(HTTPStatus.NOT_FOUND)
                    return
                fd, available, total = opened
                try:
                    start = int(wanted.group(1))
                    last = int(wanted.group(2)) if wanted.group(2) else available - 1
                    end = min(last + 1, available, start + MAX_RESPONSE)
                    if start >= end:
                        self._empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                        return
                    self.send_response(HTTPStatus.PARTIAL_CONTENT)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header(
                        "Content-Range", f"bytes {start}-{end - 1}/{total if total else '*'}"
                    )
                    self.send_header("Content-Length", str(end - start))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self._send(fd, start, end)
                except (BrokenPipeError, ConnectionResetError):
                    return
                except TimeoutError:
                    log.warning(
                        "peer_client_too_slow",
                        client=self.client_address[0],
                        key=key,
                        limit_seconds=server.settings.send_timeout_seconds,
                    )
                    return
                finally:
                    os.close(fd)

            def _send(self, fd: int, start: int, end: int) -> None:
                position = start
                while position < end:
                    count = min(CHUNK, end - position)
                    data = os.pread(fd, count, position)
                    if len(data) < count:  # a hole at the end not yet extended: zeros
                        data += bytes(count - len(data))
                    server.pacer.take(len(data))
                    self.wfile.write(data)
                    position += len(data)
                    server.served += len(data)

            def _empty(self, status: HTTPStatus) -> None:
                self.send_empty(status, {"Connection": "close"})

        return Handler


def _open_file(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None


def peer_server_for(settings: Settings) -> PeerServer:
    """This host's peer server, reading its copies in progress from the peer registry."""
    from worker.app.runtime import redis_client
    from worker.stores.redis_peers import RedisPeerRegistry

    registry = RedisPeerRegistry(
        redis_client(settings.coordination, settings.redis),
        settings.result_expires,
        settings.peer.secret,
    )
    return PeerServer(
        settings.peer,
        settings.cache_dir,
        lambda key: registry.copy(key, settings.host_id),
        bind=settings.peer.address or None,
    )


class PeerServerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker bootstep: in host scope, serve this host's cache to its peers."""

    label = "imgprep peer server"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._server: PeerServer | None = None

    def start(self, worker: Any) -> None:
        settings = get_settings()
        if settings.image_cache.scope != "host":
            return
        try:
            self._server = peer_server_for(settings).start()
        except OSError as error:
            log.warning("peer_server_not_started", port=settings.peer.port, error=error.strerror)
            return
        log.info(
            "peer_server_started",
            port=settings.peer.port,
            url=settings.peer_url,
            listening=settings.peer.address or "every address",
            allowed_networks=[str(network) for network in settings.peer.allowed_networks],
        )
        _warn_if_unreachable(settings.peer)

    def stop(self, worker: Any) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def _warn_if_unreachable(peer: PeerSettings) -> None:
    """An address other hosts would refuse to connect to is worth a line at start."""
    try:
        address = ipaddress.ip_address(peer.address)
    except ValueError:  # a name (or ""): resolved by each peer
        return
    if (
        in_networks(address, NEVER) is not None
        or in_networks(address, tuple(peer.allowed_networks)) is None
    ):
        log.warning(
            "peer_address_not_allowed",
            address=peer.address,
            reason="outside peer.allowed_networks: the other hosts will not connect to it",
        )
