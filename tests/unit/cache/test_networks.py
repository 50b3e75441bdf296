"""Where downloads may connect: the address each connection uses, after DNS and on every
redirect, against fetch.denied_networks. Real HTTP servers on loopback; 127.0.0.2 stands for
a denied address (nothing is ever sent off this machine)."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from domain.cache.download import download
from domain.cache.networks import (
    DEFAULT_DENIED_NETWORKS,
    NEVER_PEER_NETWORKS,
    ConnectionGuard,
    Network,
    in_networks,
)
from domain.cache.peer_client import PeerClient, PeerFailed, PeerOptions
from domain.cache.peers import PeerCopy
from domain.core.errors import SourceNotAllowed, SourceRefused
from tests.conftest import write_raw_image
from worker.cli.demo.image_server import ImageServer
from worker.settings import PeerSettings

MiB = 2**20
DENIED = "127.0.0.2"


def networks(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


@dataclass(frozen=True)
class Policy:
    denied_networks: tuple[Network, ...] = networks(f"{DENIED}/32")
    allowed_schemes: tuple[str, ...] = ("http", "https", "file")
    file_roots: tuple[Path, ...] = field(default_factory=tuple)
    connect_timeout_seconds: float = 2.0
    read_timeout_seconds: float = 2.0
    min_bytes_per_second: int = 0
    rate_window_seconds: float = 60.0
    max_image_bytes: int = 64 * MiB


@pytest.fixture
def allowed(tmp_path: Path) -> Iterator[ImageServer]:
    (tmp_path / "allowed").mkdir()
    with ImageServer(tmp_path / "allowed") as server:
        yield server


@pytest.fixture
def denied(tmp_path: Path) -> Iterator[ImageServer]:
    (tmp_path / "denied").mkdir()
    with ImageServer(tmp_path / "denied", host=DENIED) as server:
        write_raw_image(server.root / "secret.raw", size=MiB, data=b"metadata")
        yield server


def test_a_denied_address_is_refused_before_anything_is_sent(
    denied: ImageServer, tmp_path: Path
) -> None:
    with pytest.raises(SourceNotAllowed, match=rf"{DENIED} \(in {DENIED}/32\).*nothing was sent"):
        download(denied.url("secret.raw"), tmp_path / "x.part", Policy())
    assert denied.connections() == 0


def test_a_redirect_to_a_denied_address_is_refused(
    allowed: ImageServer, denied: ImageServer, tmp_path: Path
) -> None:
    # Given an allowed server that redirects to a denied one
    allowed.redirect("image.raw", denied.url("secret.raw"))
    # When the allowed URL is fetched, then the hop is refused and the denied server saw nothing
    with pytest.raises(SourceNotAllowed, match=DENIED):
        download(allowed.url("image.raw"), tmp_path / "x.part", Policy())
    assert allowed.gets("image.raw") == 1 and denied.connections() == 0


def test_a_host_name_is_checked_by_the_address_it_resolves_to(
    allowed: ImageServer, tmp_path: Path
) -> None:
    write_raw_image(allowed.root / "a.raw", size=MiB, data=b"a")
    url = f"http://localhost:{allowed.port}/a.raw"
    with pytest.raises(SourceNotAllowed, match=r"localhost resolves to 127\.0\.0\.1"):
        download(url, tmp_path / "x.part", Policy(denied_networks=networks("127.0.0.0/8")))
    assert allowed.connections() == 0


def test_every_connection_resolves_again_and_is_checked_again(
    allowed: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a name that resolves to an allowed address once, then to a denied one (DNS
    # rebinding), and a server on the allowed address that redirects to that same name
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", DENIED])

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            host = next(answers)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    allowed.redirect("first.raw", f"http://rebind.test:{allowed.port}/second.raw")
    # When it is fetched, then the second connection is refused by its new address
    with pytest.raises(SourceNotAllowed, match=rf"rebind\.test resolves to {DENIED}"):
        download(f"http://rebind.test:{allowed.port}/first.raw", tmp_path / "x.part", Policy())
    assert allowed.gets("first.raw") == 1 and allowed.gets("second.raw") == 0


@pytest.mark.parametrize(
    ("address", "denied_by"),
    [
        ("::ffff:127.0.0.2", "127.0.0.2/32"),  # IPv4-mapped
        ("2002:7f00:2::1", "127.0.0.2/32"),  # 6to4
        ("64:ff9b::7f00:2", "127.0.0.2/32"),  # NAT64
        ("169.254.169.254", "169.254.0.0/16"),
        ("::ffff:169.254.169.254", "169.254.0.0/16"),
        ("fe80::1", "fe80::/10"),
        ("0.0.0.0", "0.0.0.0/8"),  # noqa: S104 - an address checked, nothing bound
        ("::", "::/128"),
        ("::1", "::1/128"),
        ("239.1.2.3", "224.0.0.0/4"),
        ("ff02::1", "ff00::/8"),
    ],
)
def test_embedded_and_default_denied_addresses(address: str, denied_by: str) -> None:
    guard = ConnectionGuard(networks(f"{DENIED}/32", *DEFAULT_DENIED_NETWORKS))
    assert str(guard.denies(ipaddress.ip_address(address))) == denied_by


def test_ordinary_addresses_are_not_denied_by_default() -> None:
    guard = ConnectionGuard(networks(*DEFAULT_DENIED_NETWORKS))
    for address in ("192.0.2.10", "2001:db8::1", "10.0.0.1", "::ffff:192.0.2.10"):
        assert guard.denies(ipaddress.ip_address(address)) is None


def test_by_default_loopback_is_denied(allowed: ImageServer, tmp_path: Path) -> None:
    # The worker's own Redis, Flower and metrics listen on loopback: a URL cannot reach them
    write_raw_image(allowed.root / "a.raw", size=MiB, data=b"a")
    policy = Policy(denied_networks=networks(*DEFAULT_DENIED_NETWORKS))
    with pytest.raises(SourceNotAllowed, match=r"127\.0\.0\.1 \(in 127\.0\.0\.0/8\)"):
        download(allowed.url("a.raw"), tmp_path / "x.part", policy)
    assert allowed.connections() == 0


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://x/"])
def test_a_redirect_to_another_scheme_is_permanently_refused(
    allowed: ImageServer, tmp_path: Path, location: str
) -> None:
    # file:// is refused even where file URLs are allowed: a server cannot point at host files
    allowed.redirect("image.raw", location)
    with pytest.raises(SourceNotAllowed, match="may only lead to http or https"):
        download(allowed.url("image.raw"), tmp_path / "x.part", Policy())


def test_redirects_are_followed_to_an_allowed_server(
    allowed: ImageServer, tmp_path: Path, random_bytes: bytes
) -> None:
    source = write_raw_image(allowed.root / "real.raw", size=4 * MiB, data=random_bytes)
    allowed.redirect("one.raw", "/two.raw", status=301)
    allowed.redirect("two.raw", allowed.url("real.raw"), status=307)
    got = download(allowed.url("one.raw"), tmp_path / "x.part", Policy())
    assert got.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("location", "error", "text"),
    [
        ("/loop.raw", SourceRefused, "too many redirects"),
        ("http://127.0.0.1:99999/x", SourceRefused, "Port out of range"),
        ("", SourceRefused, "without a Location"),
    ],
)
def test_bad_redirects_are_permanent_errors(
    allowed: ImageServer, tmp_path: Path, location: str, error: type[Exception], text: str
) -> None:
    allowed.redirect("loop.raw", location)
    with pytest.raises(error, match=text):
        download(allowed.url("loop.raw"), tmp_path / "x.part", Policy())


def test_a_redirect_to_a_malformed_url_is_refused(allowed: ImageServer, tmp_path: Path) -> None:
    allowed.redirect("bad.raw", "http://[::1/x?token=s3cret")
    with pytest.raises(SourceRefused, match="redirected to a URL that is not valid") as refused:
        download(allowed.url("bad.raw"), tmp_path / "x.part", Policy())
    assert "s3cret" not in str(refused.value)


PEER_REFUSAL = "an address no peer may be reached at (peer.allowed_networks)"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.2.3", None),
        ("::ffff:10.1.2.3", None),  # the same host, mapped
        ("192.0.2.10", "in none of the allowed networks"),
        ("127.0.0.2", "in none of the allowed networks"),
        ("2002:a01:203::1", "in none of the allowed networks"),  # 6to4 names another host
        ("169.254.169.254", "in 169.254.0.0/16"),
        ("fe80::1", "in fe80::/10"),
        ("224.0.0.1", "in 224.0.0.0/4"),
    ],
)
def test_peers_are_reached_only_in_the_allowed_networks(address: str, reason: str | None) -> None:
    guard = ConnectionGuard(
        networks(*NEVER_PEER_NETWORKS), allowed=networks("10.0.0.0/8"), refusal=PEER_REFUSAL
    )
    assert guard.refuses(ipaddress.ip_address(address)) == reason


def test_no_peer_is_reached_on_a_metadata_network_even_if_everything_is_allowed() -> None:
    everything = networks("0.0.0.0/0", "::/0")
    guard = ConnectionGuard(networks(*NEVER_PEER_NETWORKS), allowed=everything)
    assert guard.refuses(ipaddress.ip_address("169.254.169.254")) == "in 169.254.0.0/16"
    with pytest.raises(ValueError, match="where no peer is ever reached"):
        PeerSettings(allowed_networks=networks("169.254.169.0/24"))
    assert in_networks(ipaddress.ip_address("::ffff:192.0.2.1"), everything) is not None


def test_a_peer_at_a_refused_address_is_sent_nothing(allowed: ImageServer) -> None:
    # a listener on 127.0.0.2, and a peer client allowed only 127.0.0.1
    with ImageServer(allowed.root, host=DENIED) as denied:
        client = PeerClient(
            PeerOptions(
                secret="s", connect_timeout_seconds=2, stall_seconds=2,
                allowed_networks=networks("127.0.0.1/32"),
            )
        )  # fmt: skip
        copy = PeerCopy("far", f"http://{DENIED}:{denied.port}", "entry", True, 10, 10)
        with pytest.raises(PeerFailed, match=r"127\.0\.0\.2 \(in none of the allowed networks\)"):
            b"".join(client.read("ab" * 20, copy, 0, 10))
        assert denied.connections() == 0
