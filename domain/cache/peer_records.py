"""The peer registry's records, sealed with the fleet's `peer.secret`: someone who can write to
Redis but does not hold the secret cannot make a host trust a peer, a size or a digest.

Each record (a host's copy of an entry, the bytes that copy has on disk, the digests of an image)
is stored as JSON with two more fields: `signed_at`, whole seconds since the epoch, and
`signature`, an HMAC-SHA256 with the secret of the canonical JSON of [a version tag, the kind of
record, its subject, its fields with `signed_at`]. The subject is what the record is read under:
the cache key, and for a host's records the host too, so a record copied to another image or
another host does not verify.

A record is trusted only when its signature matches under its own subject and it is fresh:
signed at most `max_age_seconds` ago (the registry's expiry; hosts sign a record again each time
they write it: a copy at every fetch of the image on that host, a size as the download writes,
the digests whenever a host announces its complete copy) and not later than `MAX_SKEW_SECONDS`
ahead of this host's clock. Anything else (unsigned, as the previous version wrote them, signed
with another secret, bound to another key or host, stale, malformed) is `UntrustedRecord`, which
the registry treats as absent: never an error, at worst the origin is asked instead of a peer.

What a replay can do. A Redis writer can put back, under its own key and host, a record a fleet
host signed within `max_age_seconds`: a statement some host really made recently. A copy or size
replayed after the host moved on points at a peer that answers 404 or sends bytes that fail the
digest (the peer is then dropped: service lost, not integrity); digests replayed from an older
version of an image can only name bytes some fleet host verified from the origin within that
window, and never override a request's own checksum (domain.cache.fleet).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

VERSION = "imgprep-peer-record-1"
MAX_SKEW_SECONDS = 60
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_RESERVED = ("signed_at", "signature")


class UntrustedRecord(Exception):
    """A record that does not carry a valid, fresh signature of the fleet for its subject."""


@dataclass(frozen=True)
class RecordSeal:
    """Signs records for the registry and checks the ones it reads back."""

    secret: str
    max_age_seconds: float
    clock: Callable[[], float] = field(default=time.time, compare=False)

    def seal(self, kind: str, subject: tuple[str, ...], fields: Mapping[str, Any]) -> str:
        """The record's JSON: `fields`, `signed_at` (now) and their signature."""
        if any(name in fields for name in _RESERVED):
            raise ValueError(f"record fields may not be named {_RESERVED}")
        signed = {**fields, "signed_at": int(self.clock())}
        return _canonical({**signed, "signature": self._mac(kind, subject, signed)})

    def unseal(self, kind: str, subject: tuple[str, ...], text: str | bytes) -> dict[str, Any]:
        """The record's fields (without `signed_at` and `signature`); UntrustedRecord unless it
        is signed with this secret, for this kind and subject, and fresh."""
        if not self.secret:
            raise UntrustedRecord("this host has no peer.secret")
        try:
            record = json.loads(text)
        except ValueError:
            raise UntrustedRecord("not JSON") from None
        if not isinstance(record, dict):
            raise UntrustedRecord("not a JSON object")
        given = record.pop("signature", None)
        if given is None:
            raise UntrustedRecord("unsigned (written before records were signed, or forged)")
        signed_at = record.get("signed_at")
        if not isinstance(given, str) or not _SIGNATURE.fullmatch(given):
            raise UntrustedRecord("malformed signature")
        if type(signed_at) is not int:
            raise UntrustedRecord("malformed signed_at (whole seconds expected)")
        if not hmac.compare_digest(self._mac(kind, subject, record), given):
            raise UntrustedRecord("bad signature (another secret, key or host)")
        age = self.clock() - signed_at
        if age > self.max_age_seconds:
            raise UntrustedRecord(f"stale (signed {age:.0f} s ago)")
        if age < -MAX_SKEW_SECONDS:
            raise UntrustedRecord(f"signed {-age:.0f} s in the future")
        del record["signed_at"]
        return record

    def _mac(self, kind: str, subject: tuple[str, ...], signed: Mapping[str, Any]) -> str:
        message = _canonical([VERSION, kind, list(subject), signed]).encode()
        return hmac.new(self.secret.encode(), message, hashlib.sha256).hexdigest()


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
