"""A peer's server on loopback for unit tests of domain.cache.fleet: it answers the peer
client's signed range requests (`/v1/<key>` and `/v1/<key>/part/<fence>`) from bytes held in
memory, and can misbehave the ways a real peer does (wrong bytes, a stall mid-stream, a 404).
The real server (worker.fleet.peer_server) is tested on its own and in
tests/integration/test_fleet.py.
"""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from domain.cache.peer_auth import verify
from domain.cache.peers import PeerCopy

_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass
class FakePeer:
    """What one peer serves and how; `served` counts the bytes it sent."""

    host: str
    data: bytes
    secret: str
    status: int = 206  # 404: it does not have the image (evicted)
    stall_after: int | None = None  # send this many bytes of the image, then nothing
    served: int = 0
    requests: list[tuple[str, int, int]] = field(default_factory=list)  # (path, start, end)
    released: threading.Event = field(default_factory=threading.Event)  # ends a stall
    url: str = ""

    def copy(self, key: str, *, complete: bool = True, size: int | None = None) -> PeerCopy:
        """The record this peer would announce for `key`."""
        return PeerCopy(
            host=self.host,
            url=self.url,
            content="entry" if complete else "source",
            complete=complete,
            size=len(self.data) if size is None else size,
            total=len(self.data),
            fence=1 if complete else 7,
            upstream="" if complete else "origin",
        )


def _handler(peer: FakePeer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            byte_range = self.headers.get("Range", "")
            refused = verify(
                peer.secret,
                "GET",
                self.path,
                byte_range,
                self.headers.get("X-Imgprep-Timestamp"),
                self.headers.get("X-Imgprep-Signature"),
            )
            matched = _RANGE.fullmatch(byte_range)
            if refused is not None or matched is None:
                self.send_error(403)
                return
            start, end = int(matched[1]), min(int(matched[2]) + 1, len(peer.data))
            peer.requests.append((self.path, start, end))
            if peer.status != 206:
                self.send_error(peer.status)
                return
            body = peer.data[start:end]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(peer.data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if peer.stall_after is not None:
                body = body[: max(0, peer.stall_after - start)]
            self.wfile.write(body)
            self.wfile.flush()
            peer.served += len(body)
            if peer.stall_after is not None:
                peer.released.wait(30)  # a peer that stopped sending, its connection open

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def serving(*peers: FakePeer) -> Iterator[None]:
    """Each peer on a port of its own on 127.0.0.1 (its `url` set) while the block runs."""
    servers = []
    try:
        for peer in peers:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(peer))
            server.daemon_threads = True
            peer.url = f"http://127.0.0.1:{server.server_address[1]}"
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            ).start()
            servers.append(server)
        yield
    finally:
        for peer in peers:
            peer.released.set()
        for server in servers:
            server.shutdown()
            server.server_close()
