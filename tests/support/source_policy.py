"""A download policy (domain.cache.download.SourcePolicy) for unit tests whose origin is a
file:// source under `file_roots`: generous timeouts and rate, so that only what a test sets
(say, `max_image_bytes`) can end a download."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from domain.cache.networks import Network

MiB = 2**20


@dataclass(frozen=True)
class FilePolicy:
    file_roots: tuple[Path, ...]
    allowed_schemes: tuple[str, ...] = ("file",)
    max_image_bytes: int = 64 * MiB
    min_bytes_per_second: int = 1
    rate_window_seconds: float = 30.0
    read_timeout_seconds: float = 30.0
    connect_timeout_seconds: float = 2.0
    denied_networks: tuple[Network, ...] = field(default_factory=tuple)
