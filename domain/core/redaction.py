"""What monitors may show of a task's arguments: JSON, with every URL stripped of secrets.

Image URLs may carry user info or a signed query string. Flower, `celery events` and Celery's own
log lines show a task's `argsrepr`/`kwargsrepr` message fields, and Celery fills them with a
Python repr of the real arguments unless the sender sets them. Every imgprep message sets them
from `message_reprs`: the arguments as JSON, URLs redacted (domain.core.urls.redact).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from domain.core.urls import redact


def looks_like_url(text: str) -> bool:
    if "://" not in text:
        return False
    try:
        parts = urlsplit(text)
    except ValueError:  # a malformed IPv6 host: still a URL to redact (redact never raises)
        return True
    return bool(parts.scheme) and bool(parts.netloc or parts.path)


# A URL inside free text (an error message, a traceback): up to the next space or quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redacted_url(url: str) -> str:
    """`url` without user info, query or fragment (`redact` never raises, even on a URL too
    malformed to parse)."""
    return redact(url)


def redacted_text(text: str) -> str:
    """`text` with every URL in it stripped of user info and query."""
    return _URL_IN_TEXT.sub(lambda match: redacted_url(match.group(0)), text)


def redacted(value: Any) -> Any:
    """`value` with every string that is a URL replaced by its redacted form."""
    if isinstance(value, str):
        return redacted_url(value) if looks_like_url(value) else value
    if isinstance(value, Mapping):
        return {str(key): redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redacted(item) for item in value]
    return value


def shown(value: Any) -> str:
    """Redacted compact JSON; what cannot be JSON is shown as its type name."""
    return json.dumps(
        redacted(value), separators=(", ", ": "), default=lambda v: f"<{type(v).__name__}>"
    )


def message_reprs(args: Iterable[Any] | None, kwargs: Mapping[str, Any] | None) -> dict[str, str]:
    """The `argsrepr` and `kwargsrepr` options of a task message carrying `args` and `kwargs`."""
    return {"argsrepr": shown(list(args or ())), "kwargsrepr": shown(dict(kwargs or {}))}
