"""Image URLs: which ones a request may name, and how one is shown without its secrets.

A request's URL is checked completely when the request is validated, so a bad one fails at
once with InvalidRequest instead of deep in a step: scheme, host, port range, no whitespace or
control characters, no fragment, no backslash, and no text that two URL parsers read as two
different hosts (the standard library's `urlsplit`, which the checks use, and urllib3's
`parse_url`, which opens the connection, must agree). `redact` never raises: it is what logs,
errors and monitors show of any URL, valid or not.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from urllib.parse import urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

MAX_URL_LENGTH = 4096
WEB_SCHEMES = ("http", "https")
URL_SCHEMES = (*WEB_SCHEMES, "file", "rbd")
# Glance's location of an image in Ceph: rbd://<cluster fsid>/<pool>/<image>/<snapshot>
RBD_LOCATION = re.compile(
    r"^rbd://(?P<fsid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"/(?P<pool>[A-Za-z0-9._-]{1,128})/(?P<image>[A-Za-z0-9._-]{1,128})"
    r"/(?P<snapshot>[A-Za-z0-9._-]{1,128})$"
)

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$)(?:{_LABEL}\.)*{_LABEL}\.?")
# scheme, then the authority (up to the first /, ? or #), then the path: for redaction only.
_LOOSE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?://([^/?#]*))?([^?#]*)")


def check_url(url: str) -> str:
    """`url` if an image may be fetched from it; ValueError naming what is wrong otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters")
    if any(_unprintable(character) for character in url):
        raise ValueError("must not contain whitespace or control characters")
    if "\\" in url:
        raise ValueError("must not contain a backslash")
    if "#" in url:
        raise ValueError("must not have a fragment ('#')")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:  # an out-of-range port, a malformed IPv6 address
        raise ValueError(f"is not a valid URL: {error}") from None
    scheme = parts.scheme.lower()
    if not scheme or not (parts.netloc or parts.path):
        raise ValueError("must be an absolute URL such as https://host/image.qcow2")
    if scheme not in URL_SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not one of {', '.join(URL_SCHEMES)}")
    if scheme == "rbd":
        if not RBD_LOCATION.fullmatch(url):
            raise ValueError(
                "an rbd URL names a snapshot in a Ceph cluster: rbd://<fsid>/<pool>/<image>/<snap>"
            )
        return url
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError("a file URL names an absolute path on this host: file:///path")
        return url
    _check_authority(url, parts.netloc, parts.hostname or "", port)
    return url


def _unprintable(character: str) -> bool:
    return character.isspace() or unicodedata.category(character) in ("Cc", "Cf", "Zl", "Zp")


def _check_authority(url: str, netloc: str, host: str, port: int | None) -> None:
    if not host:
        raise ValueError("names no host: http(s) URLs look like https://host/image.qcow2")
    if netloc.count("@") > 1:
        raise ValueError("has more than one '@' in its host part")
    if port == 0 or netloc.endswith(":"):
        raise ValueError("names no valid port (1-65535)")
    if netloc.rpartition("@")[2].startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(
            f"host {host!r} is not a host name or IP address (write other names in their "
            "ASCII form, xn--…)"
        )
    try:
        theirs = parse_url(url)
    except LocationParseError:
        raise ValueError("cannot be parsed by the HTTP client") from None
    if (theirs.host or "").strip("[]").lower() != host.lower() or theirs.port != port:
        raise ValueError("is read as different hosts by different URL parsers")


def redact(url: str) -> str:
    """The URL without user info, query or fragment, for logs and error messages; never raises."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
        return f"{parts.scheme}://{host}{parts.path}"
    except ValueError:
        loose = _LOOSE.match(url)
        if loose is None:
            return "<unparsable URL>"
        scheme, authority, path = loose.groups()
        return f"{scheme}://{(authority or '').rpartition('@')[2]}{path}"
