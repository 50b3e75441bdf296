"""Paths under the configured roots, and nothing outside them.

Names that come from requests are validated by the wire models (one path component, no dots
leading); these helpers also refuse a component that is a symbolic link, so a link planted in a
shared directory cannot move a disk outside its root.

Two kinds of check, in this order: the lexical ones (`lexical_child`, `lexical_under`: what a
path says, read from the request alone) and then the ones that look at the machine (links,
directories, files). A step runs every lexical check of its whole request before it looks at
the machine, so an invalid request is refused as invalid whatever the state of the host, and
the refusal tells whoever can write to the broker nothing about which files exist.
"""

from __future__ import annotations

import os
from pathlib import Path

from domain.core.errors import InvalidRequest
from domain.core.publish import RECORD, is_temporary_name


def lexical_child(root: Path, name: str) -> Path:
    """`root/name` for a single path component (looks at nothing on the machine)."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise InvalidRequest(f"{name!r} is not a valid name")
    return root / name


def child(root: Path, name: str) -> Path:
    """`root/name` for a single, non-link path component."""
    path = lexical_child(root, name)
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


def reserved_name(name: str) -> bool:
    """Names of the temporaries (`.part`, `.part.<fence>`, …) and of the description (`.json`)
    written beside each artifact (domain.core.publish)."""
    return name.endswith(RECORD) or is_temporary_name(name)


def lexical_under(root: Path, target: str) -> Path:
    """The file `target` names under `root`, as far as the words go (looks at nothing on the
    machine): a relative path, or an absolute one inside `root`, of plain names, the last not a
    reserved one (the temporaries and the description written beside each artifact)."""
    candidate = Path(target)
    if candidate.is_absolute():
        if not candidate.is_relative_to(root):
            raise InvalidRequest(f"{target} is outside {root}")
        candidate = candidate.relative_to(root)
    parts = candidate.parts
    if not parts:
        raise InvalidRequest(f"{target!r} names no file under {root}")
    if reserved_name(parts[-1]):
        raise InvalidRequest(
            f"{target!r}: names ending in .json, .part or .converted (or either followed by "
            ".<digits>) are reserved"
        )
    path = root
    for name in parts:
        path = lexical_child(path, name)
    return path


def path_under(root: Path, target: str, *, create_parents: bool = False) -> Path:
    """The file `target` names under `root`: a relative path, or an absolute one inside `root`.

    Each component must be a plain name (no '..', no symbolic link); parents are created when
    asked. Reserved names are refused: the temporaries and the description that are written
    beside each artifact.
    """
    parts = lexical_under(root, target).relative_to(root).parts
    directory = root
    for name in parts[:-1]:
        directory = child(directory, name)
        if create_parents:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
            raise InvalidRequest(f"{directory} is not a directory")
    path = child(directory, parts[-1])
    if not inside(root, path):
        raise InvalidRequest(f"{target} resolves outside {root}")
    return path
