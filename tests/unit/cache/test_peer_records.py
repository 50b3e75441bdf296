"""The peer registry's records sealed with the fleet's secret (domain.cache.peer_records): only a
holder of the secret can write one a host trusts, for the very key and host it is read under,
and only for a while."""

from __future__ import annotations

import json

import pytest

from domain.cache.peer_records import RecordSeal, UntrustedRecord

KEY = "ab" * 20
FIELDS = {"host": "h1", "url": "http://127.0.0.11:9809", "complete": True, "size": 4096}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sealed(secret: str = "s3cret", clock: Clock | None = None) -> str:  # noqa: S107 - a test key
    return RecordSeal(secret, 3600, clock or Clock()).seal("copy", (KEY, "h1"), FIELDS)


def test_a_sealed_record_reads_back_as_its_fields() -> None:
    assert RecordSeal("s3cret", 3600, Clock()).unseal("copy", (KEY, "h1"), sealed()) == FIELDS


@pytest.mark.parametrize(
    ("kind", "subject", "reason"),
    [
        ("copy", ("cd" * 20, "h1"), "bad signature"),  # moved to another image
        ("copy", (KEY, "h2"), "bad signature"),  # moved to another host
        ("size", (KEY, "h1"), "bad signature"),  # read as another kind of record
    ],
)
def test_a_record_is_bound_to_its_kind_key_and_host(
    kind: str, subject: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(UntrustedRecord, match=reason):
        RecordSeal("s3cret", 3600, Clock()).unseal(kind, subject, sealed())


def test_only_the_fleet_secret_makes_a_trusted_record() -> None:
    seal = RecordSeal("s3cret", 3600, Clock())
    with pytest.raises(UntrustedRecord, match="bad signature"):
        seal.unseal("copy", (KEY, "h1"), sealed(secret="guessed"))
    with pytest.raises(UntrustedRecord, match=r"no peer\.secret"):
        RecordSeal("", 3600, Clock()).unseal("copy", (KEY, "h1"), sealed())


def test_a_changed_field_breaks_the_signature() -> None:
    record = json.loads(sealed())
    record["url"] = "http://127.6.6.6:9809"
    with pytest.raises(UntrustedRecord, match="bad signature"):
        RecordSeal("s3cret", 3600, Clock()).unseal("copy", (KEY, "h1"), json.dumps(record))


def test_records_of_the_previous_version_are_unsigned_and_untrusted() -> None:
    old = json.dumps({"host": "h1", "url": "http://h1:9809", "content": "entry", "complete": True})
    with pytest.raises(UntrustedRecord, match="unsigned"):
        RecordSeal("s3cret", 3600, Clock()).unseal("copy", (KEY, "h1"), old)


def test_a_record_is_trusted_only_while_fresh() -> None:
    clock = Clock()
    text = sealed(clock=clock)
    seal = RecordSeal("s3cret", 3600, clock)
    clock.now += 3600
    assert seal.unseal("copy", (KEY, "h1"), text) == FIELDS
    clock.now += 1
    with pytest.raises(UntrustedRecord, match="stale"):
        seal.unseal("copy", (KEY, "h1"), text)
    # signed ahead of this host's clock beyond the skew a fleet tolerates: refused too
    with pytest.raises(UntrustedRecord, match="in the future"):
        seal.unseal("copy", (KEY, "h1"), sealed(clock=Clock(clock.now + 120)))


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        json.dumps({**FIELDS, "signed_at": 1_800_000_000, "signature": "x" * 64}),
        json.dumps({**FIELDS, "signed_at": 1_800_000_000, "signature": 7}),
        json.dumps({**FIELDS, "signed_at": 1_800_000_000.5, "signature": "a" * 64}),
        json.dumps({**FIELDS, "signed_at": "1800000000", "signature": "a" * 64}),
        json.dumps({**FIELDS, "signed_at": True, "signature": "a" * 64}),
        '{"host": "h1", "signed_at": NaN, "signature": "' + "a" * 64 + '"}',
    ],
)
def test_malformed_records_are_untrusted_never_an_error(text: str) -> None:
    with pytest.raises(UntrustedRecord):
        RecordSeal("s3cret", 3600, Clock()).unseal("copy", (KEY, "h1"), text)
