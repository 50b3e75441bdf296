"""A host's peer server on loopback, read by the peer client: signed range requests of complete
entries and of the current holder's temporary, nothing else (worker.fleet.peer_server)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import urllib3

from domain.cache.directory import CacheRecord
from domain.cache.peer_auth import signed_headers
from domain.cache.peer_client import PeerClient, PeerFailed, PeerOptions
from domain.cache.peers import PeerCopy
from domain.core.models import CachedImage
from domain.core.publish import FileStamp, record_path
from worker.fleet.peer_server import PeerServer
from worker.settings import PeerSettings

KEY = "ab" * 20
SECRET = "unit-secret"
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[PeerServer, dict[str, PeerCopy], Path]]:
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = cache / KEY
    entry.write_bytes(bytes(range(256)) * 64)
    image = CachedImage(
        key=KEY,
        image_id="img",
        path=str(entry),
        format="raw",
        virtual_size=16384,
        source_sha256=hashlib.sha256(entry.read_bytes()).hexdigest(),
    )
    record = CacheRecord(
        image=image,
        source="http://origin/img",
        source_format="raw",
        source_bytes=16384,
        fence=1,
        fetched_at=datetime.now(UTC),
        file=FileStamp.of(entry),
    )
    record_path(entry).write_text(record.model_dump_json())
    copies: dict[str, PeerCopy] = {}
    server = _any_port(cache, copies).start()
    yield server, copies, cache
    server.stop()


def _any_port(cache: Path, copies: dict[str, PeerCopy]) -> PeerServer:
    from worker.cli.demo.ports import free_port

    return PeerServer(
        PeerSettings(secret=SECRET, port=free_port(), allowed_networks=LOOPBACK),
        cache,
        copies.get,
        bind="127.0.0.1",
    )


def client(secret: str = SECRET) -> PeerClient:
    return PeerClient(
        PeerOptions(
            secret=secret, connect_timeout_seconds=2, stall_seconds=2, allowed_networks=LOOPBACK
        )
    )


def url(server: PeerServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def test_a_complete_entry_is_served_by_range(
    served: tuple[PeerServer, dict[str, PeerCopy], Path],
) -> None:
    server, _, cache = served
    copy = PeerCopy("h", url(server), "entry", True, 16384, 16384)
    got = b"".join(client().read(KEY, copy, 100, 4196))
    assert got == (cache / KEY).read_bytes()[100:4196]


def test_a_temporary_is_served_only_within_the_recorded_bytes(
    served: tuple[PeerServer, dict[str, PeerCopy], Path],
) -> None:
    server, copies, cache = served
    (cache / f"{KEY}.part.7").write_bytes(b"x" * 1000)  # 1000 bytes written, a hole after
    copies[KEY] = PeerCopy("h", url(server), "source", False, 3000, None, 7, "origin")
    copy = copies[KEY]
    assert b"".join(client().read(KEY, copy, 0, 3000)) == b"x" * 1000 + bytes(2000)
    # beyond what the registry says is on disk: nothing
    with pytest.raises(PeerFailed):
        b"".join(client().read(KEY, copy, 3000, 4000))
    # another holder's fence: not served
    other = PeerCopy("h", url(server), "source", False, 3000, None, 8, "origin")
    with pytest.raises(PeerFailed):
        b"".join(client().read(KEY, other, 0, 10))


def test_unsigned_wrongly_signed_and_outside_paths_are_refused(
    served: tuple[PeerServer, dict[str, PeerCopy], Path],
) -> None:
    server, _, _ = served
    copy = PeerCopy("h", url(server), "entry", True, 16384, 16384)
    with pytest.raises(PeerFailed, match="HTTP 401"):
        b"".join(client("wrong").read(KEY, copy, 0, 10))
    pool = urllib3.PoolManager()
    assert (
        pool.request("GET", url(server) + f"/v1/{KEY}", headers={"Range": "bytes=0-9"}).status
        == 401
    )
    for path in ("/v1/../../etc/passwd", f"/v1/{KEY}.json", "/etc/passwd", f"/v1/{KEY}/part/x"):
        # sent as it is (http.client does not normalise the path), correctly signed
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.request("GET", path, headers=signed_headers(SECRET, "GET", path, "bytes=0-9"))
        assert connection.getresponse().status == 404, path
        connection.close()


def raw_request(server: PeerServer, text: bytes) -> bytes:
    """What the server answers to `text` sent as it is, until it closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        answer = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # closed unread
            sock.sendall(text)
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def test_a_signed_header_given_twice_is_refused(
    served: tuple[PeerServer, dict[str, PeerCopy], Path],
) -> None:
    server, _, _ = served
    path = f"/v1/{KEY}"
    headers = signed_headers(SECRET, "GET", path, "bytes=0-9")
    lines = [f"GET {path} HTTP/1.1", "Host: h", *(f"{k}: {v}" for k, v in headers.items())]
    lines.append("Range: bytes=0-16383")  # served would be the first; refused outright
    answer = raw_request(server, ("\r\n".join(lines) + "\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 401 ")


def test_a_request_longer_than_any_peer_s_is_cut_off_unanswered(
    served: tuple[PeerServer, dict[str, PeerCopy], Path],
) -> None:
    server, _, _ = served
    text = f"GET /v1/{KEY} HTTP/1.1\r\n".encode() + b"X-Padding: " + b"a" * 60000 + b"\r\n"
    assert raw_request(server, text) == b""
    # and the server goes on serving
    copy = PeerCopy("h", url(server), "entry", True, 16384, 16384)
    assert len(b"".join(client().read(KEY, copy, 0, 10))) == 10
