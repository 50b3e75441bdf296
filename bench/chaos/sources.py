"""The image server of a campaign: serves the catalogue's files on 127.0.0.1, each at its own
rate (None: as fast as it goes), and on the nemesis's demand stalls a source (every transfer of
it stops sending mid-body until the stall ends; a new one sends its headers and first chunk,
then waits), as a server that hangs or a link that drops everything would, or trickles it (one
byte every second, well within any read timeout: only a minimum transfer rate ends such a
download). `DeniedListener` listens where images may not come from (127.0.0.2, denied to the
workers) and counts the connections it gets: none may come.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO

from worker.http_serving import (
    QuietHandler,
    QuietHTTPServer,
    ServedInThread,
    keep_pace,
    requested_name,
    served_file,
)

CHUNK = 64 * 2**10
STALL_POLL = 0.05
TRICKLE_EVERY = 1.0  # seconds between the bytes of a trickling source
DENIED_ADDRESS = "127.0.0.2"  # loopback, denied to the workers (cluster.Tuning)


class SourceServer:
    """Serve the files of `root`; `rates` maps a file name to its bytes per second."""

    def __init__(self, root: Path, rates: dict[str, int | None]) -> None:
        self.root = root
        self.rates = dict(rates)
        self._lock = threading.Lock()
        self._stalled_until: dict[str, float] = {}
        self._trickling_until: dict[str, float] = {}
        self._active: Counter[str] = Counter()
        self.gets: Counter[str] = Counter()
        self._closing = threading.Event()
        self._serving = ServedInThread(
            QuietHTTPServer(("127.0.0.1", 0), self._handler()), "chaos-sources"
        )

    @property
    def port(self) -> int:
        return self._serving.port

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self) -> SourceServer:
        self._serving.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._serving.stop()

    # -- the nemesis's controls ------------------------------------------------------------

    def stall(self, name: str, seconds: float) -> None:
        with self._lock:
            self._stalled_until[name] = time.monotonic() + seconds

    def unstall(self, name: str) -> None:
        with self._lock:
            self._stalled_until.pop(name, None)

    def trickle(self, name: str, seconds: float) -> None:
        with self._lock:
            self._trickling_until[name] = time.monotonic() + seconds

    def untrickle(self, name: str) -> None:
        with self._lock:
            self._trickling_until.pop(name, None)

    def active(self) -> dict[str, int]:
        """Transfers in progress, by file name."""
        with self._lock:
            return {name: count for name, count in self._active.items() if count}

    # -- serving ---------------------------------------------------------------------------

    def _wait_while_stalled(self, name: str) -> None:
        while not self._closing.is_set():
            with self._lock:
                until = self._stalled_until.get(name, 0.0)
            if time.monotonic() >= until:
                return
            time.sleep(STALL_POLL)

    def _trickling(self, name: str) -> bool:
        with self._lock:
            return time.monotonic() < self._trickling_until.get(name, 0.0)

    def _send(self, name: str, source: BinaryIO, size: int, out: BinaryIO) -> None:
        rate = self.rates.get(name)
        sent = 0
        started = time.monotonic()
        while sent < size:
            if sent:  # a stall or a trickle always lets the headers and the first chunk through
                self._wait_while_stalled(name)
            if sent and self._trickling(name):
                out.write(source.read(1))
                out.flush()
                sent += 1
                if self._closing.wait(TRICKLE_EVERY):
                    return
                started = time.monotonic() - sent / rate if rate else started
                continue
            chunk = source.read(min(CHUNK, size - sent))
            if not chunk:
                return
            out.write(chunk)
            sent += len(chunk)
            if rate:
                keep_pace(sent, rate, started)

    def _handler(self) -> type[QuietHandler]:
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                name = requested_name(self.path)
                path = served_file(server.root, name)
                with server._lock:
                    server.gets[name] += 1
                if path is None:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                with open(path, "rb") as source:
                    size = os.fstat(source.fileno()).st_size
                    self.send_response(HTTPStatus.OK)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    with server._lock:
                        server._active[name] += 1
                    try:
                        server._send(name, source, size, self.wfile)  # type: ignore[arg-type]
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    finally:
                        with server._lock:
                            server._active[name] -= 1

        return Handler


class DeniedListener:
    """A TCP listener on the denied address that counts connections and answers none."""

    def __init__(self) -> None:
        self._socket = socket.create_server((DENIED_ADDRESS, 0))
        self._socket.settimeout(0.2)
        self.connections = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-denied", daemon=True)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def url(self, name: str) -> str:
        return f"http://{DENIED_ADDRESS}:{self.port}/{name}"

    def start(self) -> DeniedListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            connection.close()
