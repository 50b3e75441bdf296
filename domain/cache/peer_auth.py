"""How peers authenticate each other's requests: an HMAC-SHA256, with the fleet's shared
`peer.secret`, of the method, the path, the Range header and a timestamp. A request whose
timestamp is more than `MAX_SKEW_SECONDS` away from the server's clock is refused, so a
recorded request cannot be replayed later.

The signed fields are parsed strictly before anything is computed from them: the timestamp is
whole seconds since the epoch in decimal digits (no sign, fraction, exponent, `nan`, `inf`,
spaces or underscores, which Python's `float()` and `int()` would take), the signature exactly 64
lowercase hexadecimal digits. Anything else is refused as malformed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

TIMESTAMP_HEADER = "X-Imgprep-Timestamp"
SIGNATURE_HEADER = "X-Imgprep-Signature"
SIGNED_HEADERS = ("Range", TIMESTAMP_HEADER, SIGNATURE_HEADER)
MAX_SKEW_SECONDS = 60

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


def signature(secret: str, method: str, path: str, byte_range: str, timestamp: str) -> str:
    message = "\n".join((method.upper(), path, byte_range, timestamp)).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, method: str, path: str, byte_range: str) -> dict[str, str]:
    """The headers of a signed request (the Range header included)."""
    timestamp = str(int(time.time()))
    return {
        "Range": byte_range,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, method, path, byte_range, timestamp),
    }


def verify(  # noqa: PLR0917 - the parts of the request, in the order they are signed
    secret: str,
    method: str,
    path: str,
    byte_range: str,
    timestamp: str | None,
    given: str | None,
    *,
    now: float | None = None,
) -> str | None:
    """None when the request is authentic and fresh, else why it is refused."""
    if not secret:
        return "this host has no peer.secret"
    if not timestamp or not given:
        return "unsigned request"
    malformed = _malformed(timestamp, given)
    if malformed is not None:
        return malformed
    skew = abs((time.time() if now is None else now) - int(timestamp))
    if skew > MAX_SKEW_SECONDS:
        return f"stale timestamp ({skew:.0f} s away)"
    expected = signature(secret, method, path, byte_range, timestamp)
    if not hmac.compare_digest(expected, given):
        return "bad signature"
    return None


def _malformed(timestamp: str, given: str) -> str | None:
    if not _TIMESTAMP.fullmatch(timestamp):
        return "malformed timestamp (whole seconds since the epoch expected)"
    if not _SIGNATURE.fullmatch(given):
        return "malformed signature (64 hexadecimal digits expected)"
    return None
