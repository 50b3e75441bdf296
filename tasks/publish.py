"""The one shape every artifact-producing step follows (Nova's `cache()` and `fetch_to_raw`):

    find it → return it | take the lease → find it again → remove stale temporaries →
    stage into `<target>.part` → verify → fence check → rename into place → fsync the directory

A crash at any point leaves either nothing or a complete artifact under the final name. A holder
whose lease was taken over learns it at the fence and does not publish.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import structlog

from tasks.errors import LockLost
from tasks.ports import Lease

log = structlog.get_logger(__name__)

T = TypeVar("T")

PART = ".part"
SIDECAR = ".json"


@dataclass(frozen=True)
class Staged(Generic[T]):
    """A complete, verified temporary file ready to be renamed to the target."""

    file: Path
    result: T
    sidecar: str | None = None  # written atomically to `<target>.json` before the rename


def part_path(target: Path) -> Path:
    return target.with_name(target.name + PART)


def sidecar_path(target: Path) -> Path:
    return target.with_name(target.name + SIDECAR)


def temporaries(target: Path, extra_suffixes: Sequence[str] = ()) -> list[Path]:
    """Every temporary name a holder may leave beside `target`."""
    names = [PART, SIDECAR + PART, *extra_suffixes]
    return [target.with_name(target.name + suffix) for suffix in names]


def publish_once(
    target: Path,
    *,
    find: Callable[[], T | None],
    lease: Lease,
    stage: Callable[[Path], Staged[T]],
    extra_temporaries: Sequence[str] = (),
) -> T:
    """Return the artifact at `target`, producing it under `lease` only if nobody has."""
    found = find()
    if found is not None:
        return found
    with lease:
        found = find()
        if found is not None:
            return found
        temps = temporaries(target, extra_temporaries)
        removed = remove_files(temps)
        if removed:
            log.info(
                "stale_temporaries_removed", target=target.name, files=[p.name for p in removed]
            )
        try:
            staged = stage(part_path(target))
            lease.ensure_held()
            commit(target, staged)
        except BaseException:
            discard_own_temporaries(lease, temps)
            raise
        return staged.result


def commit(target: Path, staged: Staged[T]) -> None:
    """Make the staged file durable, rename it (and its sidecar first) into place, and make
    the renames durable: a crash leaves the old state or the whole new file, never a part."""
    if staged.sidecar is not None:
        write_atomically(sidecar_path(target), staged.sidecar)
    fsync_file(staged.file)
    os.replace(staged.file, target)
    fsync_directory(target.parent)


def fsync_file(path: Path) -> None:
    """Wait until the data of `path` is on disk (cheap when its writer already synced it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(path.name + PART)
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_files(paths: Sequence[Path]) -> list[Path]:
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def discard_own_temporaries(lease: Lease, temps: Sequence[Path]) -> None:
    """Remove this holder's temporaries, unless the lease passed on: then they may be the next
    holder's, and the next holder removes ours when it starts."""
    try:
        lease.ensure_held()
    except LockLost:
        log.warning("temporaries_left_to_next_holder", files=[p.name for p in temps])
        return
    except Exception:  # Redis unreachable: leave the files, the next holder cleans up
        log.warning("temporaries_left_unverified", files=[p.name for p in temps])
        return
    remove_files(temps)
