"""Redis URLs as imgprep accepts them: one server (`redis://`, `rediss://`, `unix://`), or the
Sentinels of a replicated Redis in Celery's form, `sentinel://h1:26379;sentinel://h2:26379/0`
(each Sentinel a `;`-separated URL, the database number on any of them, put on each by
`normalised`; the master's name is a setting of its own, `redis.master_name`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

SENTINEL_SCHEME = "sentinel"
SEPARATOR = ";"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    """The Sentinels to ask for the master, the database, and the master's credentials (those of
    the first Sentinel URL that carries any, as kombu and Celery read them)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel(url: str) -> SentinelUrl:
    """The parts of a Sentinel URL; ValueError naming what is wrong."""
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    username: str | None = None
    password: str | None = None
    for raw in url.split(SEPARATOR):
        chunk = raw.strip()
        if not chunk:
            continue
        parts = urlsplit(chunk)
        if parts.scheme.lower() != SENTINEL_SCHEME:
            raise ValueError(
                f"every part of a Sentinel URL must be sentinel://host:port, not {parts.scheme!r}"
            )
        try:
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError("a Sentinel's port must be a number in 1-65535") from None
        if not parts.hostname:
            raise ValueError("every Sentinel URL needs a host: sentinel://host:26379")
        if parts.query or parts.fragment:
            raise ValueError("a Sentinel URL takes no query or fragment")
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"the database of a Sentinel URL is a number, not {path!r}")
            dbs.add(int(path))
        if password is None and (parts.password or parts.username):
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password else None
        sentinels.append((parts.hostname, port))
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one Sentinel")
    if len(dbs) > 1:
        raise ValueError(f"the Sentinel URLs name different databases: {sorted(dbs)}")
    return SentinelUrl(
        sentinels=tuple(sentinels),
        db=dbs.pop() if dbs else 0,
        username=username or None,
        password=password,
    )


def normalised(url: str) -> str:
    """A Sentinel URL with its database on every part: kombu takes the database from the first
    URL only, Celery's result backend from the first, and a reader from the last."""
    db = parse_sentinel(url).db
    parts = [urlsplit(chunk.strip()) for chunk in url.split(SEPARATOR) if chunk.strip()]
    return SEPARATOR.join(part._replace(path=f"/{db}").geturl() for part in parts)


def with_password(url: str, password: str | None, username: str | None = None) -> str:
    """`url` with credentials for the Redis servers put into each Sentinel part (where kombu and
    Celery read the master's password), unless the URL already carries some; other URLs as
    they are when they carry credentials."""
    if not password:
        return url
    parts = [chunk.strip() for chunk in url.split(SEPARATOR) if chunk.strip()]
    out = []
    for chunk in parts:
        split = urlsplit(chunk)
        if split.password or split.username:
            return url
        user = quote(username, safe="") if username else ""
        netloc = f"{user}:{quote(password, safe='')}@{split.netloc}"
        out.append(split._replace(netloc=netloc).geturl())
    return SEPARATOR.join(out)


def display(url: str) -> str:
    """`url` without its passwords, for logs and error messages."""
    out = []
    for chunk in url.split(SEPARATOR):
        split = urlsplit(chunk.strip())
        if split.password:
            host = split.netloc.rsplit("@", 1)[1]
            user = split.username or ""
            out.append(split._replace(netloc=f"{user}:***@{host}").geturl())
        else:
            out.append(chunk)
    return SEPARATOR.join(out)
