"""What someone who can write to Redis, without the fleet's secret, can make the peer registry
(worker.stores.redis_peers) say: nothing. What it wrote reads as absent, never as an error."""

from __future__ import annotations

import json

import fakeredis

from domain.cache.peers import ImageDigests, PeerCopy
from worker.stores.redis_peers import PEERS_PREFIX, RedisPeerRegistry

KEY, OTHER = "ab" * 20, "cd" * 20
SECRET = "unit-secret"
COPY = PeerCopy("h1", "http://127.0.0.11:9809", "entry", True, 4096, 4096)
DIGESTS = ImageDigests("a" * 64, 4096, "a" * 64, 4096, "raw", "raw")


def registry(client: fakeredis.FakeRedis, secret: str = SECRET) -> RedisPeerRegistry:
    return RedisPeerRegistry(client, 3600, secret)


def test_records_written_without_the_secret_read_as_absent() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    # as the previous version wrote them (unsigned), or as an attacker would
    client.hset(
        PEERS_PREFIX + KEY,
        "evil",
        json.dumps({"host": "evil", "url": "http://127.6.6.6:1", "content": "entry",
                    "complete": True, "total": 4096, "fence": 0, "upstream": ""}),
    )  # fmt: skip
    client.hset(PEERS_PREFIX + KEY + ":size", "evil", 4096)
    client.set(PEERS_PREFIX + KEY + ":digests", json.dumps(DIGESTS.__dict__))
    assert registry(client).copies(KEY) == []
    assert registry(client).copy(KEY, "evil") is None
    assert registry(client).digests(KEY) is None
    # signed with another secret: the same
    registry(client, "guessed").announce(KEY, COPY)
    registry(client, "guessed").record_digests(KEY, DIGESTS)
    assert registry(client).copies(KEY) == [] and registry(client).digests(KEY) is None


def test_a_genuine_record_moved_elsewhere_reads_as_absent() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    registry(client).announce(KEY, COPY)
    registry(client).record_digests(KEY, DIGESTS)
    genuine = client.hget(PEERS_PREFIX + KEY, "h1")
    assert genuine is not None
    # under another host's name, under another image's key
    client.hset(PEERS_PREFIX + KEY, "h2", genuine)
    client.hset(PEERS_PREFIX + OTHER, "h1", genuine)
    client.set(PEERS_PREFIX + OTHER + ":digests", client.get(PEERS_PREFIX + KEY + ":digests") or "")
    assert registry(client).copies(KEY) == [COPY]
    assert registry(client).copies(OTHER) == []
    assert registry(client).digests(OTHER) is None


def test_a_size_is_trusted_only_for_the_copy_it_was_signed_for() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    partial = PeerCopy("h1", "http://127.0.0.11:9809", "source", False, 0, None, 7, "origin")
    registry(client).announce(KEY, partial)
    registry(client).progress(KEY, "h1", 7, 1024)
    assert registry(client).copy(KEY, "h1") == PeerCopy(
        "h1", "http://127.0.0.11:9809", "source", False, 1024, None, 7, "origin"
    )
    # a bigger size, unsigned or signed for the host's copy of another image: not believed
    client.hset(PEERS_PREFIX + KEY + ":size", "h1", 10**9)
    assert registry(client).copy(KEY, "h1") == partial
    registry(client).progress(OTHER, "h1", 7, 10**9)
    client.hset(
        PEERS_PREFIX + KEY + ":size", "h1", client.hget(PEERS_PREFIX + OTHER + ":size", "h1") or ""
    )
    assert registry(client).copy(KEY, "h1") == partial
