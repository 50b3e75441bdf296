"""Downloads from a real local HTTP server and from files: typed errors, sparse output, hashes."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from domain.cache.download import download
from domain.cache.networks import Network
from domain.core.errors import (
    ImageTooLarge,
    SourceNotAllowed,
    SourceNotFound,
    SourceRefused,
    SourceUnavailable,
)
from domain.core.urls import redact
from tests.conftest import write_raw_image
from worker.cli.demo.image_server import ImageServer

MiB = 2**20


@dataclass(frozen=True)
class Policy:
    allowed_schemes: tuple[str, ...] = ("http", "https", "file")
    file_roots: tuple[Path, ...] = field(default_factory=tuple)
    denied_networks: tuple[Network, ...] = ()  # the test server is on loopback
    connect_timeout_seconds: float = 2.0
    read_timeout_seconds: float = 2.0
    min_bytes_per_second: int = 0
    rate_window_seconds: float = 60.0
    max_image_bytes: int = 64 * MiB


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ImageServer]:
    (tmp_path / "served").mkdir()
    with ImageServer(tmp_path / "served") as running:
        yield running


def test_http_download_is_hashed_and_sparse(
    server: ImageServer, tmp_path: Path, random_bytes: bytes
) -> None:
    # Given a 32 MiB raw image with 512 KiB of data
    source = write_raw_image(server.root / "disk.raw", size=32 * MiB, data=random_bytes)
    # When it is downloaded
    dest = tmp_path / "out.part"
    got = download(server.url("disk.raw"), dest, Policy())
    # Then the bytes and hash match and the zeros became holes
    assert got.size == 32 * MiB
    assert got.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert dest.read_bytes() == source.read_bytes()
    assert os.stat(dest).st_blocks * 512 < 2 * MiB


def test_progress_is_reported_up_to_the_total(
    server: ImageServer, tmp_path: Path, random_bytes: bytes
) -> None:
    write_raw_image(server.root / "p.raw", size=12 * MiB, data=random_bytes)
    seen: list[tuple[int, int | None]] = []
    download(
        server.url("p.raw"),
        tmp_path / "p.part",
        Policy(),
        lambda done, total: seen.append((done, total)),
    )
    assert seen[-1] == (12 * MiB, 12 * MiB)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [
        (404, SourceNotFound, "HTTP 404"),
        (410, SourceNotFound, "HTTP 410"),
        (403, SourceRefused, "HTTP 403"),
        (503, SourceUnavailable, "HTTP 503"),
        (429, SourceUnavailable, "HTTP 429"),
        (500, SourceUnavailable, "500"),
    ],
)
def test_status_codes_map_to_error_classes(
    server: ImageServer, tmp_path: Path, status: int, error: type[Exception], text: str
) -> None:
    write_raw_image(server.root / "s.raw", size=MiB, data=b"x")
    server.fail_next("s.raw", status)
    with pytest.raises(error, match=text):
        download(server.url("s.raw"), tmp_path / "s.part", Policy())


def test_missing_file_on_server_is_not_found(server: ImageServer, tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound, match="404"):
        download(server.url("nope.raw"), tmp_path / "n.part", Policy())


def test_unreachable_server_is_transient(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="cannot reach"):
        download("http://127.0.0.1:9/x.raw", tmp_path / "u.part", Policy())


def test_disallowed_scheme_is_refused_before_any_request(tmp_path: Path) -> None:
    with pytest.raises(SourceNotAllowed, match="'ftp' is not allowed"):
        download("ftp://example/x", tmp_path / "f.part", Policy())
    with pytest.raises(SourceNotAllowed, match="'file' is not allowed"):
        download("file:///etc/passwd", tmp_path / "f.part", Policy(allowed_schemes=("https",)))
    assert not (tmp_path / "f.part").exists()


def test_size_limit_from_header_and_from_stream(server: ImageServer, tmp_path: Path) -> None:
    write_raw_image(server.root / "big.raw", size=8 * MiB, data=b"x")
    with pytest.raises(ImageTooLarge, match="more than the allowed"):
        download(server.url("big.raw"), tmp_path / "b.part", Policy(max_image_bytes=MiB))


def test_file_source_inside_roots(tmp_path: Path, random_bytes: bytes) -> None:
    root = tmp_path / "images"
    root.mkdir()
    source = write_raw_image(root / "a.raw", size=4 * MiB, data=random_bytes)
    got = download(f"file://{source}", tmp_path / "a.part", Policy(file_roots=(root,)))
    assert got.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


def test_file_source_outside_roots_and_through_links_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"host secret")
    (root / "link.raw").symlink_to(secret)
    policy = Policy(file_roots=(root,))
    with pytest.raises(SourceNotAllowed, match="outside the allowed file roots"):
        download(f"file://{secret}", tmp_path / "x.part", policy)
    with pytest.raises(SourceNotAllowed, match="outside the allowed file roots"):
        download(f"file://{root}/link.raw", tmp_path / "y.part", policy)
    with pytest.raises(SourceNotAllowed, match="outside the allowed file roots"):
        download(f"file://{root}/../secret.raw", tmp_path / "z.part", policy)
    with pytest.raises(SourceNotAllowed, match="not a regular file"):
        download(f"file://{root}", tmp_path / "w.part", Policy(file_roots=(tmp_path,)))


def test_file_source_outside_roots_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    # Given roots and, outside them, a name that does not exist and one that is a directory
    root = tmp_path / "images"
    root.mkdir()
    policy = Policy(file_roots=(root,))
    # Then neither is opened: both are refused as not allowed, saying nothing of the file
    # (not "does not exist", not "is not a regular file", nor a permission error)
    for n, outside in enumerate((tmp_path / "absent.raw", tmp_path)):
        with pytest.raises(SourceNotAllowed, match="outside the allowed file roots"):
            download(f"file://{outside}", tmp_path / f"{n}.part", policy)
    # while a missing file inside the roots is not found
    with pytest.raises(SourceNotFound, match="does not exist"):
        download(f"file://{root}/absent.raw", tmp_path / "y.part", policy)


def test_redact_hides_credentials_and_query() -> None:
    assert (
        redact("https://user:pw@h.example:8443/i.qcow2?X-Amz-Signature=s")
        == "https://h.example:8443/i.qcow2"
    )


class _Chunked(BaseHTTPRequestHandler):
    """Serves BODY with chunked transfer encoding and no Content-Length, in uneven pieces."""

    protocol_version = "HTTP/1.1"
    body = b""

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(self.body), 100_003):
            piece = self.body[start : start + 100_003]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


def test_chunked_response_without_length(tmp_path: Path) -> None:
    # Given a server that streams 3 MiB of data in chunks, announcing no length
    _Chunked.body = os.urandom(3 * MiB)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Chunked)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        # When it is downloaded, then every byte arrived, in order
        url = f"http://127.0.0.1:{httpd.server_address[1]}/chunked.raw"
        seen: list[int | None] = []
        got = download(url, tmp_path / "c.part", Policy(), lambda done, total: seen.append(total))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert got.size == 3 * MiB and (tmp_path / "c.part").read_bytes() == _Chunked.body
    assert set(seen) == {None}
