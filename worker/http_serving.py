"""What imgprep's HTTP servers share (the fleet's peer server, the demo's image server, the fault
campaign's sources): a server served by a thread of its own, a handler that keeps quiet and
answers empty responses in one call; and for the file servers, a threaded server that counts
connections and keeps quiet about clients that hang up, the file a request names, and pacing a
body to a rate."""

from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


class ServedInThread:
    """`httpd` served by a daemon thread of its own, from `start` until `stop`."""

    def __init__(self, httpd: HTTPServer, name: str) -> None:
        self.httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # shut down in 50 ms, not socketserver's 500
            name=name,
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 without an access log on stderr, and empty answers in one call."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Answer `status` with `headers` and no body."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


class QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    accepted = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        self.accepted += 1  # one accepting thread: no lock needed
        super().process_request(request, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up (a killed worker, a read timeout, a closed keep-alive) are not
        errors here."""
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


def requested_name(request_path: str) -> str:
    """The file name a GET asks for (`/a%20b?x` -> `a b`)."""
    return unquote(urlsplit(request_path).path).lstrip("/")


def served_file(root: Path, name: str) -> Path | None:
    """The regular file `name` under `root`, or None (outside it or absent: a 404)."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return None
    return path


def keep_pace(sent: int, rate: int, started: float) -> None:
    """Sleep until `sent` bytes are no faster than `rate` bytes per second since `started`."""
    ahead = sent / rate - (time.monotonic() - started)
    if ahead > 0:
        time.sleep(ahead)
