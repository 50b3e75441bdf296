"""The one shape every artifact-producing step follows (Nova's `cache()` and `fetch_to_raw`):

    find it → return it | take the lease → remove every holder's temporaries → find it again →
    remove a broken entry → stage into this holder's own temporaries → verify →
    write the record's temporary → fence check → rename the record, then the artifact, into
    place without replacing anything → fsync the directory → remove this holder's temporaries

Names. Every holder writes only names of its own, tagged with its fencing token (unique per
acquisition of any lock): `<target>.part.<fence>` (the artifact being staged),
`<target>.json.part.<fence>` (its record), and any extra kind a step stages through
(`<target>.converted.<fence>`). Nobody else ever writes into them, so whatever a holder renames
into place is a complete file that it wrote and verified itself. The final names are `<target>`
and, for artifacts with a record, `<target>.json`; both are created only by `rename_new`
(RENAME_NOREPLACE), never replaced, and removed only by a holder of the lease (the repair below,
the cache manager's eviction, a disk's deletion).

What readers trust. An artifact with a record is an entry only when the record reads and
describes the file under the final name (its size and inode, `FileStamp`); anything else is
absent to readers. So a pair under the final names is always one holder's record with that same
holder's file: complete and verified.

Why a late holder cannot publish a partial file. A holder paused after its fence check (or
between its two renames) and past its lease resumes with its lock taken over. The next holder
removes every holder's temporaries, by pattern, before it looks at the final names again: the
paused holder's renames then fail (FileNotFoundError), it learns it lost the lease, and it
raises LockLost (any error raised while the lease turns out lost becomes LockLost, retried).
Had it renamed before the next holder removed its temporaries, the next holder sees the result
on its second look: a complete entry (taken as it is), or only the record (its file can no
longer follow, since its temporary is gone: removed as broken). A late rename can never replace
an entry already published (RENAME_NOREPLACE), so nothing under an overlay's backing file ever
changes.

Crash points (record first, then the artifact):
* before the record's rename: only temporaries, removed by the next holder;
* between the two renames: a record without its file, which readers treat as absent and the
  next holder removes as broken;
* after both: a complete entry (the directory fsync makes the renames durable; the data was
  fsynced before). With the link fallback of `rename_new`, a temporary name may also stay
  behind as a second link of the published file; the next holder or the cache manager removes
  it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict

from domain.core.errors import LockLost
from domain.core.fileops import (
    fsync_directory,
    fsync_file,
    remove_files,
    rename_new,
    write_new,
)
from domain.core.ports import Lease

log = structlog.get_logger(__name__)

T = TypeVar("T")

PART = "part"  # kind of the artifact being staged
RECORD_PART = "json.part"  # kind of its record being staged
RECORD = ".json"

# Every temporary name, of this version (`.<kind>.<fence>`) and of earlier ones (`.<kind>`).
_TEMPORARY = re.compile(r"\.(part|converted)(\.[0-9]+)?$")


@dataclass(frozen=True)
class Staged(Generic[T]):
    """A complete, verified temporary file of this holder's, ready to be published."""

    file: Path
    result: T
    record: str | None = None  # published as `<target>.json` before the file


class FileStamp(BaseModel):
    """What a record says about its file, so a reader can tell it describes that very file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        stat = path.stat()
        return cls(size=stat.st_size, inode=stat.st_ino)

    def matches(self, path: Path) -> bool:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        return (stat.st_size, stat.st_ino) == (self.size, self.inode)


def record_path(target: Path) -> Path:
    return target.with_name(target.name + RECORD)


def temporary_path(target: Path, kind: str, fence: int) -> Path:
    """The temporary of kind `kind` of the holder with fencing token `fence`."""
    return target.with_name(f"{target.name}.{kind}.{fence}")


def is_temporary_name(name: str) -> bool:
    """Whether `name` is a temporary of some artifact (of any holder, any version)."""
    return _TEMPORARY.search(name) is not None


def stale_temporaries(target: Path, kinds: Sequence[str] = (PART, RECORD_PART)) -> list[Path]:
    """Every holder's temporaries of `target` that exist now, found by pattern."""
    alternatives = "|".join(re.escape(kind) for kind in kinds)
    pattern = re.compile(re.escape(target.name) + rf"\.(?:{alternatives})(?:\.[0-9]+)?")
    try:
        with os.scandir(target.parent) as entries:
            return sorted(target.parent / e.name for e in entries if pattern.fullmatch(e.name))
    except FileNotFoundError:
        return []


def publish_once(
    target: Path,
    *,
    find: Callable[[], T | None],
    lease: Lease,
    stage: Callable[[Path], Staged[T]],
    with_record: bool = False,
    extra_temporaries: Sequence[str] = (),
) -> T:
    """Return the artifact at `target`, producing it under `lease` only if nobody has.

    `find` returns the artifact when it is complete (for one with a record: the record
    describes the file), else None. `stage` writes the artifact into the temporary it is given
    (extra temporaries of its own: `temporary_path(target, kind, lease.fence)`).
    """
    found = find()
    if found is not None:
        return found
    kinds = (PART, *((RECORD_PART,) if with_record else ()), *extra_temporaries)
    with lease:
        removed = remove_files(stale_temporaries(target, kinds))
        if removed:
            log.info(
                "stale_temporaries_removed", target=target.name, files=[p.name for p in removed]
            )
        # looked at only now: a holder that lost its lease may have published until its
        # temporaries went, and from here on it cannot
        found = find()
        if found is not None:
            return found
        if with_record:
            remove_broken(target)
        own = [temporary_path(target, kind, lease.fence) for kind in kinds]
        try:
            staged = stage(own[0])
            commit(target, staged, lease)
        except Exception as error:
            raise lost_or(error, lease) from error
        finally:
            remove_files(own)
        return staged.result


def commit(target: Path, staged: Staged[T], lease: Lease) -> None:
    """Make the staged file (and its record) durable, check the fence, rename the record then
    the file into place without replacing anything, and make the renames durable."""
    fsync_file(staged.file)
    record_part = None
    if staged.record is not None:
        record_part = temporary_path(target, RECORD_PART, lease.fence)
        write_new(record_part, staged.record)
    lease.ensure_held()
    try:
        if record_part is not None:
            rename_new(record_part, record_path(target))
        rename_new(staged.file, target)
    except FileExistsError as error:
        raise LockLost(
            f"{Path(str(error.filename)).name} appeared while this worker was publishing it: "
            "another holder's lease overlapped this one's; this worker's copy is discarded"
        ) from None
    fsync_directory(target.parent)


def lost_or(error: Exception, lease: Lease) -> Exception:
    """`error`, or LockLost when the lease turned out lost meanwhile: a paused holder whose
    temporaries the next holder removed fails with whatever its next file operation raised, and
    that must be retried (the retry finds the next holder's entry), not reported as the cause."""
    if isinstance(error, LockLost):
        return error
    try:
        lease.ensure_held()
    except LockLost as lost:
        return LockLost(f"{lost} (meanwhile this step failed with {type(error).__name__}: {error})")
    except Exception:  # Redis unreachable: the step's own error is all we know
        return error
    return error


def remove_broken(target: Path) -> list[Path]:
    """Under the lease, after every temporary is gone: remove what is under the final names but
    is not a complete entry (`find` said so). Its owner can no longer complete it, since its
    temporaries are gone; the record goes first, so a reader never sees a half-removed pair."""
    removed = remove_files([record_path(target)]) + remove_files([target])
    if removed:
        fsync_directory(target.parent)
        log.warning("broken_entry_removed", target=target.name, files=[p.name for p in removed])
    return removed
