"""Choosing a peer, and signing peer requests (domain.cache.fleet, domain.cache.peer_auth)."""

from __future__ import annotations

import random
import time

import pytest

from domain.cache.fleet import choose_peer
from domain.cache.peer_auth import signature, signed_headers, verify
from domain.cache.peers import ImageDigests, PeerCopy

DIGESTS = ImageDigests("a" * 64, 100, "a" * 64, 100, "raw", "raw")


def partial(host: str, size: int, upstream: str) -> PeerCopy:
    return PeerCopy(host, f"http://{host}", "source", False, size, None, 1, upstream)


def complete(host: str) -> PeerCopy:
    return PeerCopy(host, f"http://{host}", "entry", True, 100, 100)


def choose(
    copies: list[PeerCopy], me: str = "me", excluded: frozenset[str] = frozenset()
) -> PeerCopy | None:
    return choose_peer(
        copies,
        me=me,
        have=None,
        digests=DIGESTS,
        excluded=lambda host: host in excluded,
        rng=random.Random(0),  # noqa: S311 - a seeded choice, not a secret
    )


def test_complete_copies_come_first_the_least_loaded_of_them() -> None:
    copies = [complete("a"), complete("b"), partial("c", 90, "a"), partial("d", 5, "origin")]
    assert choose(copies) == complete("b")  # a already serves c
    assert choose(copies, excluded=frozenset({"b"})) == complete("a")


def test_a_burst_forms_a_chain_and_never_a_cycle() -> None:
    # h1 fetches from the origin; each newcomer streams from the one nobody streams from yet
    copies = [partial("h1", 40, "origin")]
    for host in ("h2", "h3", "h4"):
        chosen = choose(copies, me=host)
        assert chosen is not None and chosen.host == copies[-1].host
        copies.append(partial(host, 0, chosen.host))
    # a copy that streams from this host (even through others) is never chosen by it
    assert choose([partial("x", 50, "y"), partial("y", 10, "me")], me="me") is None


def test_without_digests_only_source_bytes_are_taken() -> None:
    # an entry's bytes can be checked only against a recorded digest
    chosen = choose_peer(
        [complete("a"), partial("b", 10, "origin")],
        me="me",
        have=None,
        digests=None,
        excluded=lambda host: False,
        rng=random.Random(0),  # noqa: S311 - a seeded choice, not a secret
    )
    assert chosen is not None and chosen.host == "b"


def test_signatures_cover_method_path_range_and_time() -> None:
    headers = signed_headers("s3cret", "GET", "/v1/" + "0" * 40, "bytes=0-99")
    stamp, signature = headers["X-Imgprep-Timestamp"], headers["X-Imgprep-Signature"]
    path = "/v1/" + "0" * 40
    assert verify("s3cret", "GET", path, "bytes=0-99", stamp, signature) is None
    assert verify("other", "GET", path, "bytes=0-99", stamp, signature) == "bad signature"
    assert verify("s3cret", "GET", path, "bytes=0-", stamp, signature) == "bad signature"
    assert verify("s3cret", "GET", path + "x", "bytes=0-99", stamp, signature) == "bad signature"
    stale = verify("s3cret", "GET", path, "bytes=0-99", stamp, signature, now=float(stamp) + 61)
    assert stale is not None and stale.startswith("stale timestamp")
    assert verify("s3cret", "GET", path, "bytes=0-99", None, None) == "unsigned request"
    assert verify("", "GET", path, "bytes=0-99", stamp, signature) is not None


def test_a_peer_dropped_for_stalling_is_asked_again_once_its_copy_grows() -> None:
    from domain.cache.fleet import still_excluded

    now = 100.0
    # Within its cooldown a dropped peer is not asked
    assert still_excluded(until=103.0, stalled_at=None, size=5, now=now)
    assert still_excluded(until=103.0, stalled_at=8, size=8, now=now)
    # after it, it is
    assert not still_excluded(until=99.0, stalled_at=None, size=5, now=now)
    # and a peer dropped for stalling at 8 bytes whose record now shows more is asked at once
    # (before the origin is: the fleet's origin bytes stay one image)
    assert not still_excluded(until=103.0, stalled_at=8, size=9, now=now)
    # while one dropped for another reason (wrong bytes: forever) is not, whatever it shows
    assert still_excluded(until=float("inf"), stalled_at=None, size=9, now=now)


@pytest.mark.parametrize(
    "stamp",
    ["nan", "NaN", "inf", "-inf", "1e9", "{now}.5", "+{now}", " {now}", "{now} ", "-{now}",
     "{now_}", "\uff10{now}", "0x10", "", "1" * 13],
)  # fmt: skip
def test_a_timestamp_that_is_not_whole_seconds_is_refused(stamp: str) -> None:
    now = int(time.time())
    stamp = stamp.format(now=now, now_=f"{now:_}")
    path, byte_range = "/v1/" + "0" * 40, "bytes=0-99"
    # correctly signed with the secret: only the timestamp's form is wrong
    given = signature("s3cret", "GET", path, byte_range, stamp)
    refused = verify("s3cret", "GET", path, byte_range, stamp, given)
    assert refused is not None and refused.startswith(("malformed timestamp", "unsigned")), refused


@pytest.mark.parametrize("given", ["A" * 64, "a" * 63, "a" * 65, "g" * 64, " " + "a" * 63])
def test_a_signature_that_is_not_64_hex_digits_is_refused(given: str) -> None:
    stamp = str(int(time.time()))
    refused = verify("s3cret", "GET", "/v1/" + "0" * 40, "bytes=0-9", stamp, given)
    assert refused == "malformed signature (64 hexadecimal digits expected)"
