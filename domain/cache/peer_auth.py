"""How peers authenticate each other's requests: an HMAC-SHA256, with the fleet's shared
`peer.secret`, of the method, the path, the Range header and a timestamp. A request whose
timestamp is more than `MAX_SKEW_SECONDS` away from the server's clock is refused, so a
recorded request cannot be replayed later."""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Imgprep-Timestamp"
SIGNATURE_HEADER = "X-Imgprep-Signature"
MAX_SKEW_SECONDS = 60.0


def signature(secret: str, method: str, path: str, byte_range: str, timestamp: str) -> str:
    message = "\n".join((method.upper(), path, byte_range, timestamp)).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, method: str, path: str, byte_range: str) -> dict[str, str]:
    """The headers of a signed request (the Range header included)."""
    timestamp = f"{time.time():.3f}"
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
    try:
        sent = float(timestamp)
    except ValueError:
        return "malformed timestamp"
    skew = abs((time.time() if now is None else now) - sent)
    if skew > MAX_SKEW_SECONDS:
        return f"stale timestamp ({skew:.0f} s away)"
    expected = signature(secret, method, path, byte_range, timestamp)
    if not hmac.compare_digest(expected, given):
        return "bad signature"
    return None
