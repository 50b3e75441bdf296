"""Redis replies as text or bytes, whether the client decodes responses or not."""

from __future__ import annotations


def text(value: bytes | str, errors: str = "strict") -> str:
    """A key or value read from Redis as text. `errors="replace"` for what others wrote (a
    peer's record, a campaign's leftovers): read, never refused for its bytes."""
    return value.decode(errors=errors) if isinstance(value, bytes) else value


def as_bytes(value: bytes | str) -> bytes:
    """A key or value read from Redis as bytes, as it was written."""
    return value.encode() if isinstance(value, str) else value
