"""The fleet's trust boundaries (issue 19), played as the attackers would, on real processes: real
workers in host scope, their real peer servers on loopback, one real Redis.

Someone who can write to Redis but does not hold `peer.secret` writes peer records and digests
where hosts read them, the way the previous version wrote them; a host's cache never holds
the attacker's bytes, the origin serves the request, and a request's checksum is checked before
anything is published. A peer record pointing at an address outside `peer.allowed_networks`
(127.0.0.2 here) gets nothing sent to it. Anyone who can reach a peer port cannot hold the
server's transfer slots by not reading, cannot hold threads by not finishing a request, and
cannot sign a request that never expires.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.cache.directory import cache_key
from domain.cache.peer_auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature, signed_headers
from domain.cache.peers import ImageDigests, PeerCopy
from domain.core.models import PreparedDisk
from tests.integration.conftest import DENIED_ADDRESS, ClusterFactory, unique
from tests.integration.fleet import SECRET, FakePeer, Fleet, MiB, image_file, make_fleet
from tests.support.waiting import wait_for
from worker.stores.redis_peers import PEERS_PREFIX, RedisPeerRegistry

# where hosts read the registry (the attacker knows it too), and where the previous version kept it
PREFIXES = sorted({PEERS_PREFIX, "imgprep:peers:"})


@pytest.fixture
def one_host(cluster_factory: ClusterFactory, tmp_path: Path) -> Iterator[Fleet]:
    with make_fleet(cluster_factory, tmp_path, hosts=("h1",)) as made:
        yield made


def logged(fleet: Fleet, host: str, event: str) -> list[dict[str, Any]]:
    return [line for line in fleet.logs(host) if line.get("event") == event]


def assert_from_origin(fleet: Fleet, host: str, image_id: str, checksum: str, since: int) -> None:
    """The host's cache file is the image with `checksum`, and the origin sent the whole image
    since it had sent `since` bytes."""
    assert f"sha256:{fleet.entry_sha256(host, image_id)}" == checksum
    size = fleet.hosts[host].cache.entry(cache_key(image_id)).stat().st_size
    assert fleet.origin.bytes_sent - since >= size, (fleet.origin.bytes_sent, since, size)


# -- a Redis writer without the secret -----------------------------------------------------------


def forge_records(
    fleet: Fleet,
    key: str,
    peer: FakePeer,
    attacker: bytes,
    *,
    source_sha256: str,
    converted: bool,
) -> None:
    """What an attacker who can write to Redis writes: a peer holding the complete entry (its
    own server), its size, and digests that vouch for its bytes, as the previous version wrote
    them (no signature: it has no secret)."""
    redis, size = fleet.cluster.redis, len(attacker)
    copy = {
        "host": "evil",
        "url": peer.url,
        "content": "entry",
        "complete": True,
        "total": size,
        "fence": 0,
        "upstream": "",
    }
    for prefix in PREFIXES:
        redis.hset(prefix + key, "evil", json.dumps(copy))
        redis.hset(prefix + key + ":size", "evil", size)
    digests = {
        "source_sha256": source_sha256,
        "source_size": size,
        "entry_sha256": hashlib.sha256(attacker).hexdigest(),
        "entry_size": size,
        "entry_format": "raw",
        "source_format": "qcow2" if converted else "raw",
    }
    for prefix in PREFIXES:
        redis.set(prefix + key + ":digests", json.dumps(digests))


@pytest.mark.parametrize(
    ("with_checksum", "claims_the_source"),
    [
        # no checksum: the forged digests vouch for the attacker's bytes
        (False, False),
        # the request's checksum, digests of the attacker's bytes (before: the attacker's bytes
        # were published into the cache, then the request failed with ChecksumMismatch)
        (True, False),
        # the request's checksum, digests claiming the attacker's bytes are that source
        # converted to raw (a peer's copy of a converted entry cannot be hashed to the checksum)
        (True, True),
    ],
    ids=["no-checksum", "checksum", "checksum-claimed-conversion"],
)
def test_records_forged_in_redis_never_put_the_attacker_s_bytes_into_a_cache(
    one_host: Fleet, with_checksum: bool, claims_the_source: bool
) -> None:
    fleet = one_host
    # Given an image at the origin, and the attacker's bytes (another raw image of that size)
    # served by the attacker's own peer server
    size = 4 * MiB
    name, checksum = image_file(fleet.origin.root, "good.raw", size, seed=21)
    attacker = random.Random(22).randbytes(size)  # noqa: S311 - test data
    image_id = unique("img")
    key = cache_key(image_id)
    evil = FakePeer(attacker)
    try:
        source = checksum.removeprefix("sha256:") if claims_the_source else None
        forge_records(
            fleet,
            key,
            evil,
            attacker,
            source_sha256=source or hashlib.sha256(attacker).hexdigest(),
            converted=claims_the_source,
        )
        before = fleet.origin.bytes_sent

        # When a host prepares the image
        result = fleet.prepare(name, image_id, "h1", checksum if with_checksum else None)

        # Then it succeeds with the origin's bytes: the forged records were as good as absent,
        # nothing was asked of the attacker's peer, and the cache file is the image
        prepared = PreparedDisk.model_validate(result.get(timeout=120))
        assert prepared.base.source_sha256 == checksum.removeprefix("sha256:")
        assert_from_origin(fleet, "h1", image_id, checksum, since=before)
        assert (evil.connections, evil.requests) == (0, 0)
        untrusted = logged(fleet, "h1", "peer_record_untrusted")
        assert {line["record"] for line in untrusted if line["key"] == key} >= {"copy", "digests"}
    finally:
        evil.stop()
    # the attacker's keys under the previous version's names are the attacker's (imgprep no
    # longer reads or writes them), kept for ever: removed before the machine is checked
    fleet.cluster.redis.delete(*(f"imgprep:peers:{key}{end}" for end in ("", ":size", ":digests")))
    fleet.assert_clean()


def test_records_signed_with_another_secret_are_not_trusted(one_host: Fleet) -> None:
    fleet = one_host
    # Given records in the current format, signed with a secret the attacker guessed
    size = 4 * MiB
    name, checksum = image_file(fleet.origin.root, "guessed.raw", size, seed=23)
    attacker = random.Random(24).randbytes(size)  # noqa: S311 - test data
    image_id = unique("img")
    key = cache_key(image_id)
    evil = FakePeer(attacker)
    try:
        guessed = RedisPeerRegistry(fleet.cluster.redis, 3600, "guessed-" + SECRET)
        guessed.announce(key, PeerCopy("evil", evil.url, "entry", True, size, size))
        attacker_sha256 = hashlib.sha256(attacker).hexdigest()
        guessed.record_digests(
            key, ImageDigests(attacker_sha256, size, attacker_sha256, size, "raw", "raw")
        )
        before = fleet.origin.bytes_sent
        # When a host prepares it without a checksum, Then it takes the origin's bytes
        PreparedDisk.model_validate(fleet.prepare(name, image_id, "h1").get(timeout=120))
        assert_from_origin(fleet, "h1", image_id, checksum, since=before)
        assert evil.requests == 0
    finally:
        evil.stop()
    fleet.assert_clean()


def test_a_peer_copy_of_another_version_is_never_published_under_this_checksum(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    with make_fleet(cluster_factory, tmp_path, hosts=("h1", "h2")) as fleet:
        # Given h1 cached an image without a checksum, then the origin's bytes changed
        size = 4 * MiB
        name, old = image_file(fleet.origin.root, "moving.raw", size, seed=25)
        image_id = unique("img")
        PreparedDisk.model_validate(fleet.prepare(name, image_id, "h1").get(timeout=120))
        assert f"sha256:{fleet.entry_sha256('h1', image_id)}" == old
        _, new = image_file(fleet.origin.root, "moving.raw", size, seed=26)
        before = fleet.origin.bytes_sent

        # When h2 prepares it with the new bytes' checksum
        prepared = fleet.prepare(name, image_id, "h2", new)

        # Then h2 takes the new bytes from the origin (h1's copy, of another version, is not
        # taken: before, h2 published it and every request with this checksum failed there)
        PreparedDisk.model_validate(prepared.get(timeout=120))
        assert_from_origin(fleet, "h2", image_id, new, since=before)
        fleet.assert_clean()


# -- peer addresses -------------------------------------------------------------------------------


def test_a_peer_at_an_address_outside_the_allowed_networks_is_sent_nothing(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    with make_fleet(cluster_factory, tmp_path, hosts=("h1", "h2")) as fleet:
        # Given h1 cached an image, and the only copy the registry shows is at 127.0.0.2 (a
        # record signed by a fleet host: only the address is wrong), where a listener records
        # every connection
        size = 4 * MiB
        name, checksum = image_file(fleet.origin.root, "far.raw", size, seed=27)
        image_id = unique("img")
        key = cache_key(image_id)
        PreparedDisk.model_validate(fleet.prepare(name, image_id, "h1").get(timeout=120))
        image = (fleet.origin.root / name).read_bytes()
        far = FakePeer(image, host=DENIED_ADDRESS)
        try:
            fleet.registry.withdraw(key, "h1")
            fleet.registry.announce(key, PeerCopy("far", far.url, "entry", True, size, size))
            before = fleet.origin.bytes_sent

            # When h2 prepares the image
            PreparedDisk.model_validate(fleet.prepare(name, image_id, "h2", checksum).get(120))

            # Then nothing connected to 127.0.0.2; the origin served h2, which says why
            assert far.connections == 0
            assert_from_origin(fleet, "h2", image_id, checksum, since=before)
            dropped = [line["reason"] for line in logged(fleet, "h2", "peer_dropped")]
            assert any(
                f"{DENIED_ADDRESS} (in none of the allowed networks)" in r for r in dropped
            ), dropped
        finally:
            far.stop()
        fleet.assert_clean()


# -- the peer server ------------------------------------------------------------------------------


def cached_entry(fleet: Fleet, size: int, seed: int) -> str:
    """A key h1's cache holds, of `size` random bytes."""
    name, _ = image_file(fleet.origin.root, f"served-{seed}.raw", size, seed=seed)
    image_id = unique("img")
    PreparedDisk.model_validate(fleet.prepare(name, image_id, "h1").get(timeout=120))
    return cache_key(image_id)


def signed_get(
    port: int, path: str, byte_range: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """(status, body) of a GET with `headers`, signed with the fleet's secret by default."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "GET", path, headers=headers or signed_headers(SECRET, "GET", path, byte_range)
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def stalled_reader(port: int, path: str, byte_range: str) -> socket.socket:
    """A client that sends a signed request for a large range and never reads the answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    headers = signed_headers(SECRET, "GET", path, byte_range)
    lines = [f"GET {path} HTTP/1.1", "Host: peer", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for {pid}")


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (what it sent, if anything, is drained)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True
    return True


def test_clients_that_stop_reading_lose_their_slots_within_the_send_timeout(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    extra = {"IMGPREP_PEER__MAX_CONNECTIONS": "3", "IMGPREP_PEER__SEND_TIMEOUT_SECONDS": "2"}
    with make_fleet(cluster_factory, tmp_path, extra, hosts=("h1",)) as fleet:
        # Given an entry larger than what socket buffers hold, and as many signed transfers of
        # it as the server has slots, whose clients stop reading at once
        size = 16 * MiB
        key = cached_entry(fleet, size, seed=28)
        port = fleet.hosts["h1"].port
        path = f"/v1/{key}"
        stalled = [stalled_reader(port, path, f"bytes=0-{size - 1}") for _ in range(3)]
        try:
            for sock in stalled:  # each holds a slot: its answer has begun
                sock.settimeout(20)
                assert sock.recv(1, socket.MSG_PEEK) == b"H"
            # When another peer asks for bytes, again and again while those clients stay
            started = time.monotonic()

            def served() -> bool:
                return signed_get(port, path, "bytes=0-1023")[0] == 206

            # Then it is served within a few send timeouts (before: 503 for as long as the
            # stalled clients kept their connections, over 40 s in the issue)
            wait_for(served, timeout=30, what="a transfer slot freed", interval=0.5)
            assert time.monotonic() - started < 30
            slow = logged(fleet, "h1", "peer_client_too_slow")
            assert len(slow) >= 1 and all(line["limit_seconds"] == 2 for line in slow)
        finally:
            for sock in stalled:
                sock.close()
        fleet.assert_clean()


def test_connections_before_authentication_are_capped_and_timed_out(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    extra = {
        "IMGPREP_PEER__MAX_UNAUTHENTICATED_CONNECTIONS": "16",
        "IMGPREP_PEER__HEADER_TIMEOUT_SECONDS": "2",
    }
    with make_fleet(cluster_factory, tmp_path, extra, hosts=("h1",)) as fleet:
        key = cached_entry(fleet, MiB, seed=29)
        port = fleet.hosts["h1"].port
        worker = fleet.hosts["h1"].worker
        assert worker is not None
        baseline = threads_of(worker.pid)

        # Given 200 connections that each send half a request line and stop, and one that
        # sends a byte of its request every half second
        opened: list[socket.socket] = []
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            for _ in range(200):
                sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), 10))
                with contextlib.suppress(OSError):  # closed at once: beyond the cap
                    sock.sendall(b"GET /v1/")
                opened.append(sock)
            accepted_in = time.monotonic() - started
            slow = stack.enter_context(socket.create_connection(("127.0.0.1", port), 10))

            # Then the worker's main process holds a thread for at most the capped few (before:
            # one per connection, 254 of them for over a minute in the issue)
            peak = baseline
            for _ in range(10):
                peak = max(peak, threads_of(worker.pid))
                with contextlib.suppress(OSError):
                    slow.sendall(b"G")
                time.sleep(0.5)
            assert peak <= baseline + 16 + 8, (baseline, peak)
            assert accepted_in < 20, accepted_in

            # and every one of them is closed by the server within the header timeout, the
            # trickling one too, though it kept sending
            def all_closed() -> bool:
                with contextlib.suppress(OSError):
                    slow.sendall(b"E")
                return all(closed_by_server(sock) for sock in [*opened, slow])

            wait_for(all_closed, timeout=20, what="the server to close them", interval=0.5)

            # and a signed request is served
            path = f"/v1/{key}"
            assert signed_get(port, path, "bytes=0-9")[0] == 206
        assert threads_of(worker.pid) <= baseline + 8
        fleet.assert_clean()


def test_the_peer_server_answers_only_clients_in_the_allowed_networks(one_host: Fleet) -> None:
    fleet = one_host
    key = cached_entry(fleet, MiB, seed=30)
    port = fleet.hosts["h1"].port
    path = f"/v1/{key}"
    # Given a client from 127.0.0.2, outside peer.allowed_networks (127.0.0.1/32), with a
    # correctly signed request
    sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(DENIED_ADDRESS, 0))
    headers = signed_headers(SECRET, "GET", path, "bytes=0-9")
    lines = [f"GET {path} HTTP/1.1", "Host: peer", *(f"{k}: {v}" for k, v in headers.items())]
    with contextlib.suppress(OSError):
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    # Then the server closes the connection without a byte of answer
    sock.settimeout(10)
    try:
        answer = sock.recv(1024)
    except ConnectionResetError:
        answer = b""
    finally:
        sock.close()
    assert answer == b""
    refused = logged(fleet, "h1", "peer_connection_refused")
    assert any(line["client"] == DENIED_ADDRESS for line in refused)
    # while the same request from 127.0.0.1 is served
    assert signed_get(port, path, "bytes=0-9")[0] == 206
    fleet.assert_clean()


@pytest.mark.parametrize("stamp", ["nan", "NaN", "inf", "{now}.0", "+{now}", "{now}e0"])
def test_a_signed_request_with_an_odd_timestamp_is_refused(one_host: Fleet, stamp: str) -> None:
    fleet = one_host
    key = cached_entry(fleet, MiB, seed=31)
    port = fleet.hosts["h1"].port
    path, byte_range = f"/v1/{key}", "bytes=0-9"
    # Given a request signed with the fleet's secret, over a timestamp that is not whole
    # seconds (`nan` never expired before: its skew compared false with everything)
    stamp = stamp.format(now=int(time.time()))
    headers = {
        "Range": byte_range,
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: signature(SECRET, "GET", path, byte_range, stamp),
    }
    # Then it is refused, and logged with the reason
    assert signed_get(port, path, byte_range, headers)[0] == 401
    refused = logged(fleet, "h1", "peer_request_refused")
    assert any(line["reason"].startswith("malformed timestamp") for line in refused), refused
    # while the same request over whole seconds is served
    assert signed_get(port, path, byte_range)[0] == 206
    fleet.assert_clean()
