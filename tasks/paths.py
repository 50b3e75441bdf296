"""Paths under the configured roots, and nothing outside them.

Names that come from requests are validated by the wire models (one path component, no dots
leading); these helpers also refuse a component that is a symbolic link, so a link planted in a
shared directory cannot move a disk outside its root.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.errors import InvalidRequest


def child(root: Path, name: str) -> Path:
    """`root/name` for a single, non-link path component."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise InvalidRequest(f"{name!r} is not a valid name")
    path = root / name
    if path.is_symlink():
        raise InvalidRequest(f"{path} is a symbolic link; refusing to follow it")
    return path


def instance_dir(instances_dir: Path, instance_id: str, *, create: bool = False) -> Path:
    """The directory of one instance's disks."""
    path = child(instances_dir, instance_id)
    if create:
        os.makedirs(path, mode=0o755, exist_ok=True)
        if path.is_symlink() or not path.is_dir():
            raise InvalidRequest(f"{path} is not a directory")
    return path


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, resolved, is `root` or below it."""
    return path.resolve().is_relative_to(root.resolve())
