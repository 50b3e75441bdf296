"""Streaming an image from its source into a local file: http(s), or file:// under allowed roots.

The bytes are hashed as they arrive, and blocks of zeros are skipped instead of written, so a
raw image lands sparse. Failures are typed: a source that may answer later is transient, one
that refused (4xx), a disallowed URL, a size past the limit and a full disk are permanent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import IO, Protocol
from urllib.parse import unquote, urlsplit

import structlog
import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, SSLError

from tasks.errors import (
    ImageTooLarge,
    SourceNotAllowed,
    SourceNotFound,
    SourceRefused,
    SourceUnavailable,
)
from tasks.image_writer import ImageWriter, read_ahead
from tasks.ports import Progress, no_progress

log = structlog.get_logger(__name__)

CHUNK = 256 * 2**10  # measured fastest here (bench.fetch_throughput): 1-4 MiB reads were slower
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_GONE_STATUS = frozenset({404, 410})


class SourcePolicy(Protocol):
    """What a download may touch (worker.settings.FetchSettings satisfies it)."""

    @property
    def allowed_schemes(self) -> tuple[str, ...]: ...
    @property
    def file_roots(self) -> tuple[Path, ...]: ...
    @property
    def connect_timeout_seconds(self) -> float: ...
    @property
    def read_timeout_seconds(self) -> float: ...
    @property
    def max_image_bytes(self) -> int: ...


@dataclass(frozen=True)
class Downloaded:
    """What was written: its length and the sha256 of the bytes as served."""

    size: int
    sha256: str


def redact(url: str) -> str:
    """The URL without user info or query, for logs and error messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


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
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        with open_file_source(url, policy) as (source, total):
            return _stream(_file_chunks(source), total, dest, policy, progress)
    return _download_http(url, dest, policy, progress)


# -- file:// ---------------------------------------------------------------------------------------


class _FileSource:
    def __init__(self, url: str, policy: SourcePolicy) -> None:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise SourceNotAllowed(f"file URL names a remote host {parts.netloc!r}")
        self.path = Path(unquote(parts.path))
        self.policy = policy
        self.handle: IO[bytes] | None = None

    def __enter__(self) -> tuple[IO[bytes], int]:
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
            if not any(real.is_relative_to(root.resolve()) for root in self.policy.file_roots):
                raise SourceNotAllowed(f"{self.path} is outside the allowed file roots")
            stat = os.fstat(fd)
            if not S_ISREG(stat.st_mode):
                raise SourceNotAllowed(f"{self.path} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        handle = os.fdopen(fd, "rb", buffering=0)
        self.handle = handle
        return handle, stat.st_size

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()


def open_file_source(url: str, policy: SourcePolicy) -> _FileSource:
    return _FileSource(url, policy)


def _file_chunks(source: IO[bytes]) -> Iterator[bytes]:
    while chunk := source.read(CHUNK):
        yield chunk


# -- http(s) ---------------------------------------------------------------------------------------


def _pool(policy: SourcePolicy) -> urllib3.PoolManager:
    return urllib3.PoolManager(
        retries=urllib3.Retry(
            total=None, connect=0, read=0, status=0, other=0, redirect=5, raise_on_redirect=True
        ),
        timeout=urllib3.Timeout(
            connect=policy.connect_timeout_seconds, read=policy.read_timeout_seconds
        ),
    )


def _download_http(url: str, dest: Path, policy: SourcePolicy, progress: Progress) -> Downloaded:
    shown = redact(url)
    try:
        response = _pool(policy).request(
            "GET",
            url,
            preload_content=False,
            decode_content=False,
            headers={"Accept-Encoding": "identity", "User-Agent": "imgprep"},
        )
    except SSLError as error:
        raise SourceRefused(f"TLS verification failed for {shown}: {error}") from None
    except MaxRetryError as error:
        if "redirect" in str(error.reason).lower() or error.reason is None:
            raise SourceRefused(f"too many redirects from {shown}") from None
        raise SourceUnavailable(f"cannot reach {shown}: {error.reason}") from None
    except HTTPError as error:
        raise SourceUnavailable(f"cannot reach {shown}: {error}") from None
    try:
        _check_status(response.status, shown)
        _check_redirects(response, policy, shown)
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        try:
            result = _stream(
                response.stream(CHUNK, decode_content=False), total, dest, policy, progress
            )
        except HTTPError as error:
            raise SourceUnavailable(f"download of {shown} broke off: {error}") from None
        if total is not None and result.size != total:
            raise SourceUnavailable(
                f"download of {shown} ended after {result.size} of {total} bytes"
            )
        return result
    finally:
        response.release_conn()


def _check_redirects(response: urllib3.BaseHTTPResponse, policy: SourcePolicy, shown: str) -> None:
    """Refuse a redirect to a scheme the policy does not allow (https → http, say)."""
    history = response.retries.history if response.retries is not None else ()
    for hop in history:
        if hop.redirect_location:
            scheme = urlsplit(hop.redirect_location).scheme.lower()
            if scheme and scheme not in policy.allowed_schemes:
                raise SourceNotAllowed(
                    f"{shown} redirected to a {scheme} URL, which is not allowed"
                )


def _check_status(status: int, shown: str) -> None:
    if 200 <= status < 300:
        return
    if status in _RETRYABLE_STATUS:
        raise SourceUnavailable(f"{shown} answered HTTP {status}; will retry")
    if status in _GONE_STATUS:
        raise SourceNotFound(f"{shown} answered HTTP {status}: the image does not exist there")
    raise SourceRefused(f"{shown} answered HTTP {status}")


# -- writing ------------------------------------------------------------------------------------


def _stream(
    chunks: Iterator[bytes], total: int | None, dest: Path, policy: SourcePolicy, progress: Progress
) -> Downloaded:
    if total is not None and total > policy.max_image_bytes:
        raise ImageTooLarge(
            f"the image is {total} bytes, more than the allowed {policy.max_image_bytes}"
        )
    with ImageWriter(dest, total) as writer:
        for chunk in read_ahead(chunks):
            if writer.size + len(chunk) > policy.max_image_bytes:
                raise ImageTooLarge(
                    f"the image is larger than the allowed {policy.max_image_bytes} bytes"
                )
            writer.write(chunk)
            progress(writer.size, total)
        sha256 = writer.finish()
        return Downloaded(size=writer.size, sha256=sha256)
