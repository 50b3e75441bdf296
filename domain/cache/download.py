"""Streaming an image from its source into a local file: http(s), or file:// under allowed roots.

The bytes are hashed as they arrive, and blocks of zeros are skipped instead of written, so a
raw image lands sparse. The source is read in a thread of its own (domain.cache.transfer) and
watched: a download that brings less than `fetch.min_bytes_per_second` over
`fetch.rate_window_seconds` ends with SourceTooSlow, and whatever stops the step stops the
download at once. HTTP connections go only to addresses outside `fetch.denied_networks`
(domain.cache.networks), and redirects are followed here, one hop at a time, each checked before
it is requested.

Failures are typed: a source that may answer later is transient; one that refused (4xx), a
disallowed URL, scheme or address, a size past the limit and a full disk are permanent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Protocol
from urllib.parse import unquote, urljoin, urlsplit

import structlog
import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, SSLError

from domain.cache.networks import ConnectionGuard, GuardedPoolManager, Network
from domain.cache.transfer import MinimumRate, ReadAhead
from domain.cache.writer import ImageWriter
from domain.core.errors import (
    ImageTooLarge,
    SourceNotAllowed,
    SourceNotFound,
    SourceRefused,
    SourceUnavailable,
)
from domain.core.ports import Progress, no_progress
from domain.core.urls import WEB_SCHEMES, check_url, redact

log = structlog.get_logger(__name__)

CHUNK = 256 * 2**10  # measured fastest here (bench.fetch_throughput): 1-4 MiB reads were slower
MAX_REDIRECTS = 5
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_GONE_STATUS = frozenset({404, 410})


class SourcePolicy(Protocol):
    """What a download may touch (worker.settings.FetchSettings satisfies it)."""

    @property
    def allowed_schemes(self) -> tuple[str, ...]: ...
    @property
    def file_roots(self) -> tuple[Path, ...]: ...
    @property
    def denied_networks(self) -> tuple[Network, ...]: ...
    @property
    def connect_timeout_seconds(self) -> float: ...
    @property
    def read_timeout_seconds(self) -> float: ...
    @property
    def min_bytes_per_second(self) -> int: ...
    @property
    def rate_window_seconds(self) -> float: ...
    @property
    def max_image_bytes(self) -> int: ...


@dataclass(frozen=True)
class Downloaded:
    """What was written: its length and the sha256 of the bytes as served."""

    size: int
    sha256: str


class _Source(Protocol):
    """Chunks of an image, read by the read-ahead thread; `total` is set before the first."""

    total: int | None

    def chunks(self, arrived: Callable[[int], None]) -> Iterator[bytes]: ...
    def abort(self) -> None: ...


def check_source(url: str, policy: SourcePolicy) -> None:
    """Refuse a URL whose scheme is not allowed, before anything is opened."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in policy.allowed_schemes:
        allowed = ", ".join(policy.allowed_schemes) or "none"
        raise SourceNotAllowed(f"URL scheme {scheme!r} is not allowed (allowed: {allowed})")


def download(
    url: str, dest: Path, policy: SourcePolicy, progress: Progress = no_progress
) -> Downloaded:
    """Stream `url` into a new file `dest`; the caller removes `dest` on any error."""
    check_source(url, policy)
    with ImageWriter(dest, None) as writer:
        return download_into(url, writer, policy, progress)


def download_into(
    url: str,
    writer: ImageWriter,
    policy: SourcePolicy,
    progress: Progress = no_progress,
    *,
    start: int = 0,
) -> Downloaded:
    """Stream `url` from byte `start` into `writer`, which holds the bytes before it (a
    download resumed with a Range request), and finish the file: its size and the sha256 of all
    its bytes."""
    check_source(url, policy)
    source: _Source
    if urlsplit(url).scheme.lower() == "file":
        source = _FileSource(url, policy, start)
    else:
        source = _HttpSource(url, policy, start)
    return _stream(source, redact(url), writer, policy, progress)


def _stream(
    source: _Source, shown: str, writer: ImageWriter, policy: SourcePolicy, progress: Progress
) -> Downloaded:
    rate = MinimumRate(
        policy.min_bytes_per_second, policy.rate_window_seconds, what=f"the source {shown}"
    )
    tick = min(1.0, policy.rate_window_seconds / 4)
    with ReadAhead(
        source.chunks(rate.arrived), watch=rate.check, abort=source.abort, tick=tick
    ) as chunks:
        for chunk in chunks:
            if writer.size + len(chunk) > policy.max_image_bytes:
                raise ImageTooLarge(
                    f"the image is larger than the allowed {policy.max_image_bytes} bytes"
                )
            writer.expected_size = source.total
            writer.write(chunk)
            progress(writer.size, source.total)
        sha256 = writer.finish()
        return Downloaded(size=writer.size, sha256=sha256)


def _check_length(total: int | None, policy: SourcePolicy) -> None:
    if total is not None and total > policy.max_image_bytes:
        raise ImageTooLarge(
            f"the image is {total} bytes, more than the allowed {policy.max_image_bytes}"
        )


# -- file:// ---------------------------------------------------------------------------------------


class _FileSource:
    def __init__(self, url: str, policy: SourcePolicy, start: int = 0) -> None:
        self.start = start
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise SourceNotAllowed(f"file URL names a remote host {parts.netloc!r}")
        self.path = Path(unquote(parts.path))
        self.policy = policy
        self.total: int | None = None

    def chunks(self, arrived: Callable[[int], None]) -> Iterator[bytes]:
        with os.fdopen(self._open(), "rb", buffering=0) as source:
            _check_length(self.total, self.policy)
            source.seek(self.start)
            while chunk := source.read(CHUNK):
                arrived(len(chunk))
                yield chunk

    def abort(self) -> None:
        """Nothing to unblock: reads of a regular file return."""

    def _open(self) -> int:
        # Refuse a name outside the roots before opening it: whether such a file exists or may
        # be read is none of the caller's business (the answer would probe the host).
        if not self._inside_roots(Path(os.path.realpath(self.path))):
            raise SourceNotAllowed(f"{self.path} is outside the allowed file roots")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise SourceNotFound(f"{self.path} does not exist") from None
        except OSError as error:
            raise SourceNotFound(f"{self.path} cannot be read: {error.strerror}") from None
        try:
            # Check the file actually opened, not the name: a link swapped in after a check
            # cannot lead outside the roots.
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not self._inside_roots(real):
                raise SourceNotAllowed(f"{self.path} is outside the allowed file roots")
            stat = os.fstat(fd)
            if not S_ISREG(stat.st_mode):
                raise SourceNotAllowed(f"{self.path} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        self.total = stat.st_size
        return fd

    def _inside_roots(self, real: Path) -> bool:
        return any(real.is_relative_to(root.resolve()) for root in self.policy.file_roots)


# -- http(s) ---------------------------------------------------------------------------------------


class _HttpSource:
    """One GET, its redirects followed hop by hop, over connections checked by a guard."""

    def __init__(self, url: str, policy: SourcePolicy, start: int = 0) -> None:
        self.url = url
        self.start = start  # resumed: the bytes before it are on disk already
        self.shown = redact(url)
        self.policy = policy
        self.total: int | None = None
        self.guard = ConnectionGuard(policy.denied_networks)
        self.pool = GuardedPoolManager(
            self.guard,
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=0),
            timeout=urllib3.Timeout(
                connect=policy.connect_timeout_seconds, read=policy.read_timeout_seconds
            ),
        )

    def abort(self) -> None:
        self.guard.abort()

    def chunks(self, arrived: Callable[[int], None]) -> Iterator[bytes]:
        response = self._open()
        try:
            _check_status(response.status, self.shown)
            length = response.headers.get("Content-Length")
            body = int(length) if length and length.isdigit() else None
            skip = self._skip(response)
            self.total = None if body is None else body + self.start - skip
            _check_length(self.total, self.policy)
            size = 0
            for piece in self._read(response, arrived):
                size += len(piece)
                dropped = min(skip, len(piece))
                skip -= dropped
                if dropped < len(piece):
                    yield piece[dropped:]
            if body is not None and size != body:
                raise SourceUnavailable(
                    f"download of {self.shown} ended after {size} of {body} bytes"
                )
        finally:
            response.close()
            self.pool.clear()

    def _skip(self, response: urllib3.BaseHTTPResponse) -> int:
        """Bytes of the body already on disk: all `start` of them when the server ignored the
        Range request (200), none when it honoured it (206, checked to start where asked)."""
        if not self.start:
            return 0
        if response.status != 206:
            return self.start
        content_range = response.headers.get("Content-Range", "")
        unit, _, spec = content_range.partition(" ")
        first = spec.partition("-")[0]
        if unit != "bytes" or first != str(self.start):
            raise SourceUnavailable(
                f"{self.shown} answered a resumed download from byte {self.start} with "
                f"Content-Range {content_range!r}"
            )
        return 0

    def _read(
        self, response: urllib3.BaseHTTPResponse, arrived: Callable[[int], None]
    ) -> Iterator[bytes]:
        """CHUNK-sized pieces of the body, counting bytes as they arrive (read1 returns what
        the socket has, so a trickle is seen while a chunk fills)."""
        pieces: list[bytes] = []
        held = 0
        try:
            while data := response.read1(CHUNK - held, decode_content=False):
                arrived(len(data))
                pieces.append(data)
                held += len(data)
                if held >= CHUNK:
                    yield b"".join(pieces)
                    pieces, held = [], 0
        except HTTPError as error:
            raise SourceUnavailable(f"download of {self.shown} broke off: {error}") from None
        if pieces:
            yield b"".join(pieces)

    def _open(self) -> urllib3.BaseHTTPResponse:
        """The response at the end of the redirects, each hop checked before it is requested."""
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            response = self._get(url)
            location = response.headers.get("Location")
            if response.status not in _REDIRECT_STATUS:
                return response
            response.close()  # its body is not read: the connection is not reused
            if not location:
                raise SourceRefused(
                    f"{redact(url)} answered HTTP {response.status} without a Location"
                )
            url = self._hop(url, location)
        raise SourceRefused(f"too many redirects from {self.shown} (more than {MAX_REDIRECTS})")

    def _hop(self, url: str, location: str) -> str:
        try:
            target = urljoin(url, location)
            scheme = urlsplit(target).scheme.lower()
        except ValueError as error:  # a malformed IPv6 host
            raise SourceRefused(
                f"{self.shown} redirected to a URL that is not valid ({redact(location)}): {error}"
            ) from None
        if scheme not in WEB_SCHEMES or scheme not in self.policy.allowed_schemes:
            raise SourceNotAllowed(
                f"{self.shown} redirected to {redact(target)}; a redirect may only lead to "
                f"{' or '.join(s for s in WEB_SCHEMES if s in self.policy.allowed_schemes)} URLs"
            )
        try:
            check_url(target)
        except ValueError as error:
            raise SourceRefused(
                f"{self.shown} redirected to a URL that is not valid: {error}"
            ) from None
        log.info("image_source_redirected", source=self.shown, to=redact(target))
        return target

    def _get(self, url: str) -> urllib3.BaseHTTPResponse:
        shown = redact(url)
        headers = {"Accept-Encoding": "identity", "User-Agent": "imgprep"}
        if self.start:
            headers["Range"] = f"bytes={self.start}-"
        try:
            return self.pool.request(
                "GET",
                url,
                redirect=False,
                preload_content=False,
                decode_content=False,
                headers=headers,
            )
        except HTTPError as error:
            reason = (error.reason or error) if isinstance(error, MaxRetryError) else error
            if isinstance(reason, SSLError):
                raise SourceRefused(f"TLS verification failed for {shown}: {reason}") from None
            raise SourceUnavailable(f"cannot reach {shown}: {reason}") from None


def _check_status(status: int, shown: str) -> None:
    if 200 <= status < 300:
        return
    if status in _RETRYABLE_STATUS:
        raise SourceUnavailable(f"{shown} answered HTTP {status}; will retry")
    if status in _GONE_STATUS:
        raise SourceNotFound(f"{shown} answered HTTP {status}: the image does not exist there")
    raise SourceRefused(f"{shown} answered HTTP {status}")
