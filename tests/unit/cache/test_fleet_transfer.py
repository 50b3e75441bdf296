"""One host's transfer of an image in host scope (domain.cache.fleet.fetch_image, its Transfer):
peers before the origin, the origin when no peer can serve, peers that stall, 404 or send wrong
bytes dropped, checksums and size limits enforced on whatever arrives.

The registry and the locks are the in-memory fakes of their ports (tests/fakes); peers are
loopback HTTP servers that answer the real peer client (tests/support/peers_http.py); the
origin is a file:// source, so a test whose origin file does not exist proves no byte came
from it. Real qemu-img inspects what is staged, as in production."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from domain.cache.directory import ImageCache, cache_key
from domain.cache.fleet import Fleet, fetch_image
from domain.cache.peer_client import PeerOptions
from domain.cache.peers import ImageDigests, PeerCopy
from domain.cache.staging import FetchOptions
from domain.core.errors import ChecksumMismatch, ImgprepError, LockBusy
from domain.core.models import CachedImage, ImageSource
from domain.core.publish import record_path
from domain.core.runner import Limits, Runner
from tests.conftest import need_tools
from tests.fakes.locks import InMemoryLease, InMemoryLocks
from tests.fakes.peers import InMemoryPeerRegistry
from tests.support.peers_http import FakePeer, serving
from tests.support.source_policy import FilePolicy

KiB = 2**10
MiB = 2**20
SECRET = "unit-fleet-secret"
IMAGE_ID = "fleet-image"
KEY = cache_key(IMAGE_ID)
STALL_SECONDS = 1.0  # how long a peer may bring nothing before it is dropped
# Every wait in these tests ends on a condition; this bounds the whole test should it not.
pytestmark = pytest.mark.timeout(120)


@dataclass
class Host:
    """This host: its cache, the fleet as it sees it, and where the origin's file is."""

    cache: ImageCache
    fleet: Fleet
    registry: InMemoryPeerRegistry
    origin_locks: InMemoryLocks
    options: FetchOptions
    origin: Path  # the file the source URL names (absent: the origin cannot serve)

    def fetch(self, data: bytes | None = None, *, checksum: str | None = None) -> CachedImage:
        """fetch_image of the test image; `data` (when given) is what the origin serves."""
        if data is not None:
            self.origin.write_bytes(data)
        source = ImageSource(
            url=self.origin.as_uri(),
            image_id=IMAGE_ID,
            checksum=checksum,
            declared_format="raw",
        )
        return fetch_image(
            source,
            cache=self.cache,
            options=self.options,
            runner=Runner(default_timeout=60),
            locks=InMemoryLocks(),
            fleet=self.fleet,
        )

    def record_source(self) -> str:
        """Where the published entry says its bytes came from."""
        return str(self.cache.lookup(KEY).source)  # type: ignore[union-attr]

    def leftovers(self) -> list[str]:
        """Files in the cache other than the entry and its record (temporaries)."""
        wanted = {KEY, record_path(self.cache.entry(KEY)).name}
        return sorted(p.name for p in self.cache.root.iterdir() if p.name not in wanted)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    need_tools("qemu-img")
    (tmp_path / "cache").mkdir()
    (tmp_path / "sources").mkdir()
    registry = InMemoryPeerRegistry()
    origin_locks = InMemoryLocks()
    fleet = Fleet(
        host="me",
        url="http://127.0.0.1:1",
        registry=registry,
        origin_locks=origin_locks,
        choice_locks=InMemoryLocks(wait=30),
        peers=PeerOptions(
            secret=SECRET,
            connect_timeout_seconds=2,
            stall_seconds=STALL_SECONDS,
            allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),),
        ),
        poll_seconds=0.01,
        wait_seconds=60,
    )
    policy = FilePolicy(file_roots=(tmp_path / "sources",))
    return Host(
        cache=ImageCache(tmp_path / "cache"),
        fleet=fleet,
        registry=registry,
        origin_locks=origin_locks,
        options=FetchOptions(policy=policy, limits=Limits(), force_raw=False),
        origin=tmp_path / "sources" / "image.raw",
    )


def image_bytes(size: int = 1 * MiB) -> bytes:
    """A raw image: zeros where a format's magic would be, random bytes after."""
    return bytes(4 * KiB) + os.urandom(size - 4 * KiB)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_digests(data: bytes) -> ImageDigests:
    """What the fleet records once a host has published `data` as a raw entry."""
    digest = sha256(data)
    return ImageDigests(digest, len(data), digest, len(data), "raw", "raw")


def test_without_peers_the_origin_serves_and_the_copy_is_announced(host: Host) -> None:
    # Given a fleet where nobody holds the image
    data = image_bytes()
    # When this host fetches it
    image = host.fetch(data)
    # Then its entry holds the origin's bytes, and the fleet learns of the copy and its digests
    assert Path(image.path).read_bytes() == data
    assert host.record_source() == host.origin.as_uri()
    copy = host.registry.copy(KEY, "me")
    assert copy is not None and copy.complete and copy.size == len(data)
    assert host.registry.digests(KEY) == entry_digests(data)
    assert host.leftovers() == []


def test_a_second_fetch_takes_nothing_from_anyone(host: Host) -> None:
    # Given an image this host has fetched
    data = image_bytes()
    first = host.fetch(data)
    leases = list(host.origin_locks.taken)
    # When it is fetched again after the origin lost it and a peer appeared
    host.origin.unlink()
    peer = FakePeer("p1", data, SECRET)
    with serving(peer):
        host.registry.announce(KEY, peer.copy(KEY))
        again = host.fetch()
    # Then the entry is the answer, as it was: no peer and no origin was asked
    assert again == first
    assert peer.requests == []
    assert host.origin_locks.taken == leases


def test_a_complete_peer_serves_and_the_origin_is_never_asked(host: Host) -> None:
    # Given a peer with the complete entry, and its digests recorded by the fleet
    data = image_bytes()
    peer = FakePeer("p1", data, SECRET)
    with serving(peer):
        host.registry.announce(KEY, peer.copy(KEY))
        host.registry.record_digests(KEY, entry_digests(data))
        # When this host fetches the image (its origin file does not even exist)
        image = host.fetch()
    # Then every byte came from the peer, checked against the recorded digest
    assert Path(image.path).read_bytes() == data
    assert peer.served == len(data)
    assert host.record_source().startswith("peers p1 ")
    assert host.origin_locks.taken == []


def test_the_least_loaded_complete_peer_is_chosen(host: Host) -> None:
    # Given two complete peers, one of which already serves a third host's transfer
    data = image_bytes()
    busy, idle = FakePeer("busy", data, SECRET), FakePeer("idle", data, SECRET)
    with serving(busy, idle):
        host.registry.announce(KEY, busy.copy(KEY))
        host.registry.announce(KEY, idle.copy(KEY))
        third = PeerCopy("third", "http://127.0.0.1:1", "entry", False, 0, len(data), 3, "busy")
        host.registry.announce(KEY, third)
        host.registry.record_digests(KEY, entry_digests(data))
        # When this host fetches the image
        host.fetch()
    # Then the idle peer served it, and the busy one was not asked
    assert idle.served == len(data)
    assert busy.requests == []


def test_a_peer_with_wrong_bytes_is_withdrawn_and_the_origin_serves(host: Host) -> None:
    # Given the only peer, whose copy differs from the digest the fleet recorded
    data = image_bytes()
    liar = FakePeer("liar", image_bytes(), SECRET)
    with serving(liar):
        host.registry.announce(KEY, liar.copy(KEY))
        host.registry.record_digests(KEY, entry_digests(data))
        # When this host fetches the image
        image = host.fetch(data)
    # Then the peer's bytes were taken, found wrong, and thrown away; its copy is withdrawn
    # from the registry so no host asks it again; the entry holds the origin's bytes
    assert liar.served == len(data)
    assert host.registry.copy(KEY, "liar") is None
    assert Path(image.path).read_bytes() == data
    assert host.record_source() == host.origin.as_uri()
    assert host.leftovers() == []


def test_a_peer_that_no_longer_has_the_image_is_withdrawn(host: Host) -> None:
    # Given a peer the registry lists as complete, which answers 404 (it evicted the entry)
    data = image_bytes()
    gone = FakePeer("gone", data, SECRET, status=404)
    with serving(gone):
        host.registry.announce(KEY, gone.copy(KEY))
        host.registry.record_digests(KEY, entry_digests(data))
        # When this host fetches the image
        image = host.fetch(data)
    # Then the peer was asked once and withdrawn, and the origin served the image
    assert len(gone.requests) == 1
    assert host.registry.copy(KEY, "gone") is None
    assert Path(image.path).read_bytes() == data


def test_a_peer_that_stops_sending_is_dropped_and_the_origin_finishes(host: Host) -> None:
    # Given the only peer, which sends the first 256 KiB and then nothing, its connection open
    data = image_bytes()
    stalled = FakePeer("stalled", data, SECRET, stall_after=256 * KiB)
    with serving(stalled):
        host.registry.announce(KEY, stalled.copy(KEY))
        host.registry.record_digests(KEY, entry_digests(data))
        # When this host fetches the image, with the request's checksum
        image = host.fetch(data, checksum=f"sha256:{sha256(data)}")
    # Then the peer was dropped (after peer.stall_seconds without a byte) and the origin
    # completed the image, which is byte for byte the source
    assert stalled.served == 256 * KiB
    assert Path(image.path).read_bytes() == data
    assert host.record_source() == host.origin.as_uri()
    assert host.leftovers() == []


def test_a_partial_copy_that_stops_growing_is_resumed_from_the_origin(host: Host) -> None:
    # Given a peer fetching the image from the origin that has 384 KiB of it and gets no more
    data = image_bytes()
    slow = FakePeer("slow", data, SECRET)
    with serving(slow):
        host.registry.announce(KEY, slow.copy(KEY, complete=False, size=384 * KiB))
        host.registry.record_digests(KEY, ImageDigests(sha256(data), len(data)))
        # When this host fetches the image
        image = host.fetch(data)
    # Then it took the 384 KiB the peer had, and the rest from the origin (a resumed read)
    assert slow.served == 384 * KiB
    assert [start for _, start, _ in slow.requests] == [0]
    assert Path(image.path).read_bytes() == data


def test_a_checksum_of_another_version_takes_no_entry_from_peers(host: Host) -> None:
    # Given a peer whose entry is the version the fleet recorded, and a request naming another
    recorded = image_bytes()
    wanted = image_bytes()
    peer = FakePeer("p1", recorded, SECRET)
    with serving(peer):
        host.registry.announce(KEY, peer.copy(KEY))
        host.registry.record_digests(KEY, entry_digests(recorded))
        # When this host fetches the version the request names
        image = host.fetch(wanted, checksum=f"sha256:{sha256(wanted)}")
    # Then no digest of the other version vouched for the peer: the origin served the image
    assert peer.requests == []
    assert Path(image.path).read_bytes() == wanted


def test_origin_bytes_that_fail_the_checksum_publish_nothing(host: Host) -> None:
    # Given an origin that serves other bytes than the request's checksum names
    data = image_bytes()
    # When this host fetches the image
    with pytest.raises(ChecksumMismatch, match="the request expected"):
        host.fetch(data, checksum=f"sha256:{'0' * 64}")
    # Then nothing is in the cache, no copy is announced, and the origin lease is free
    assert list(host.cache.root.iterdir()) == []
    assert host.registry.copy(KEY, "me") is None
    assert host.origin_locks.held == {}


def test_a_peer_sending_more_than_the_size_limit_is_refused(host: Host) -> None:
    # Given a peer whose copy is larger than this host accepts
    data = image_bytes(2 * MiB)
    peer = FakePeer("big", data, SECRET)
    host.options = FetchOptions(
        policy=FilePolicy(file_roots=(host.origin.parent,), max_image_bytes=1 * MiB),
        limits=Limits(),
        force_raw=False,
    )
    with serving(peer):
        host.registry.announce(KEY, peer.copy(KEY))
        host.registry.record_digests(KEY, entry_digests(data))
        # When this host fetches the image
        with pytest.raises(ImgprepError, match="more than the allowed 1048576 bytes"):
            host.fetch()
    # Then it stopped at the limit, and left no temporary behind
    assert list(host.cache.root.iterdir()) == []


class AskedLocks:
    """The origin lease factory, telling when this host has asked for a lease."""

    def __init__(self, locks: InMemoryLocks) -> None:
        self.locks = locks
        self.asked = threading.Event()

    def __call__(self, name: str) -> InMemoryLease:
        self.asked.set()
        return self.locks(name)


def test_a_host_waits_for_the_origin_lease_holder_to_offer_its_copy(host: Host) -> None:
    # Given another host that holds the origin lease (it is downloading the image)
    data = image_bytes()
    peer = FakePeer("downloader", data, SECRET)
    asked = AskedLocks(host.origin_locks)
    host.fleet = dataclasses.replace(host.fleet, origin_locks=asked)

    def announce_once_asked() -> None:
        asked.asked.wait(60)
        host.registry.record_digests(KEY, entry_digests(data))
        host.registry.announce(KEY, peer.copy(KEY))

    with serving(peer), host.origin_locks(f"origin:{KEY}"):
        # When this host fetches the image, finds the lease taken, and the other host then
        # announces its finished copy
        announcer = threading.Thread(target=announce_once_asked, daemon=True)
        announcer.start()
        image = host.fetch()
        announcer.join(10)
    # Then this host streamed from it instead of going to the origin itself
    assert Path(image.path).read_bytes() == data
    assert peer.served == len(data)
    assert host.origin_locks.taken == [f"origin:{KEY}"]  # only the other host's acquisition


def test_a_host_gives_up_when_the_lease_holder_never_offers_a_copy(host: Host) -> None:
    # Given another host that holds the origin lease and never announces anything
    host.fleet = dataclasses.replace(host.fleet, wait_seconds=1.0)
    # When this host fetches the image
    with (
        host.origin_locks(f"origin:{KEY}"),
        pytest.raises(LockBusy, match="offered no copy for 1 s"),
    ):
        host.fetch(image_bytes())
    # Then it left nothing behind for a retry to trip on
    assert list(host.cache.root.iterdir()) == []
