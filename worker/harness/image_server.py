"""A local HTTP server for images, used by the demo, the tests and the benchmarks.

It serves the files of one directory, counts the connections it accepted and the GET requests
of each path, and can be told to fail the next requests of a path with a status, to redirect a
path, to serve slowly, or to trickle a path (a few bytes, then one byte every so often), so that
retry, crash, stall and redirect behaviour can be driven for real.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, defaultdict, deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any

from worker.harness.http_serving import QuietHTTPServer, keep_pace, requested_name, served_file

CHUNK = 256 * 2**10


class ImageServer:
    """Serve `root` on 127.0.0.1; `url(name)` is the address of a file in it."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._gets: Counter[str] = Counter()
        self._failures: defaultdict[str, deque[int]] = defaultdict(deque)
        self._redirects: dict[str, tuple[int, str]] = {}
        self._trickles: dict[str, tuple[int, float]] = {}
        self._stopping = threading.Event()
        self.bytes_per_second: int | None = None  # of each response; None: as fast as it goes
        self.bytes_sent = 0  # body bytes sent, every file together (what "origin bytes" count)
        self._httpd = QuietHTTPServer((host, port), self._handler())
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # shut down in 50 ms, not 500
            name="image-server",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/{name}"

    def connections(self) -> int:
        """How many TCP connections the server accepted."""
        return self._httpd.accepted

    def redirect(self, name: str, location: str, status: int = 302) -> None:
        """Answer every GET of `name` with `status` and `Location: location`."""
        with self._lock:
            self._redirects[name] = (status, location)

    def trickle(self, name: str, *, after: int, every: float) -> None:
        """Serve `name` with its full length announced, send `after` bytes of it, then one byte
        every `every` seconds (a stalled or hostile source) until the client goes away."""
        with self._lock:
            self._trickles[name] = (after, every)

    def gets(self, name: str) -> int:
        """How many GET requests reached `name` (failed ones included)."""
        with self._lock:
            return self._gets[name]

    def fail_next(self, name: str, status: int, times: int = 1) -> None:
        """Answer the next `times` GETs of `name` with `status` and no body."""
        with self._lock:
            self._failures[name].extend([status] * times)

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _next_failure(self, name: str) -> int | None:
        with self._lock:
            self._gets[name] += 1
            queue = self._failures.get(name)
            return queue.popleft() if queue else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                name = requested_name(self.path)
                status = server._next_failure(name)
                redirect = server._redirects.get(name)
                if status is None and redirect is not None:
                    self.send_response(redirect[0])
                    self.send_header("Location", redirect[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = served_file(server.root, name)
                if path is None:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                with open(path, "rb") as source:
                    size = os.fstat(source.fileno()).st_size
                    start = _range_start(self.headers.get("Range"), size)
                    if start:
                        source.seek(start)
                        self.send_response(HTTPStatus.PARTIAL_CONTENT)
                        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                    else:
                        self.send_response(HTTPStatus.OK)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(size - start))
                    self.end_headers()
                    try:
                        self._send_body(source, size - start)
                    except (BrokenPipeError, ConnectionResetError):
                        return

            def _send_body(self, source: Any, size: int) -> None:
                trickle = server._trickles.get(requested_name(self.path))
                if trickle is not None:
                    self._trickle(source, *trickle)
                    return
                rate = server.bytes_per_second
                if rate is None:
                    self.wfile.flush()
                    sent = self.connection.sendfile(source)
                    with server._lock:
                        server.bytes_sent += sent
                    return
                sent = 0
                started = time.monotonic()
                while sent < size:
                    chunk = source.read(min(CHUNK, rate))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    with server._lock:
                        server.bytes_sent += len(chunk)
                    keep_pace(sent, rate, started)

            def _trickle(self, source: Any, after: int, every: float) -> None:
                self.wfile.write(source.read(after))
                self.wfile.flush()
                while not server._stopping.wait(every):
                    byte = source.read(1)
                    if not byte:
                        return
                    self.wfile.write(byte)
                    self.wfile.flush()

        return Handler


def _range_start(header: str | None, size: int) -> int:
    """Where a `Range: bytes=N-` request starts (0 without one, or one this server ignores)."""
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return 0
    first = header.removeprefix("bytes=").removesuffix("-")
    return int(first) if first.isdigit() and int(first) < size else 0
