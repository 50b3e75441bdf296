"""Every argument of every request, checked again against the helper's own roots.

The helper trusts nothing its caller says: a worker runs unprivileged and takes its instructions
from a broker any host of the fleet can write to. Paths must be absolute, normal (no `.`, `..`
or doubled slashes), free of symbolic links from `/` down (their real path is themselves), and
exactly where imgprep puts that kind of thing:

* a disk's work area: `<devices_dir>/<instance>/<disk>`, and in it the mount point `root`, the
  FUSE export `export` and the daemon's pid file `storage-daemon.pid`. The devices directory is
  root's own tree (`<helper_state_dir>/devices`): every directory from `/` down to it is owned by
  root and writable by no one else (a root-owned sticky directory such as /tmp aside), which
  `check_root_tree` verifies at start and again before each work-area path is accepted, so no
  path in it can be swapped for a link between this check and the tool that uses it;
* an instance disk: `<instances_dir>/<instance>/<disk>`, a regular file;
* a cached base: `<cache_dir>/<key>`, a regular file. These two are the worker's, in the worker's
  directories: it can swap them for a link after this check, so the operation's child opens
  them itself without following any link (domain.guest.held_files) and hands the tools the open
  file, never the name;
* a loop device: one this helper attached (its own ledger, helper.loop_ledger) whose backing
  file the kernel reports under those roots.

Names are single path components in imgprep's alphabet (README: instance ids and disk names).
A refusal is `Refused` with the reason, which the server logs and answers.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from domain.core.errors import PrivilegeRefused
from domain.guest.tools import mount as mounts

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WORK_AREA_ENTRIES = ("root", "export", "storage-daemon.pid")


class Refused(PrivilegeRefused):
    """A request the helper will not run; the message says why."""


@dataclass(frozen=True)
class Roots:
    """Where imgprep keeps what the helper may touch (real paths, fixed at start)."""

    cache_dir: Path
    instances_dir: Path
    state_dir: Path
    allowed_filesystems: tuple[str, ...]
    devices_dir: Path

    @classmethod
    def of(
        cls,
        cache_dir: Path,
        instances_dir: Path,
        state_dir: Path,
        filesystems: tuple[str, ...],
        devices_dir: Path | None = None,
    ) -> Roots:
        return cls(
            Path(os.path.realpath(cache_dir)),
            Path(os.path.realpath(instances_dir)),
            Path(os.path.realpath(state_dir)),
            filesystems,
            Path(os.path.realpath(devices_dir or Path(state_dir) / "devices")),
        )

    # -- kinds of path ---------------------------------------------------------------------------

    def work_area(self, raw: str) -> Path:
        """`<devices_dir>/<instance>/<disk>`: a disk's work area itself."""
        path = _plain(raw)
        parts = _below(path, self.devices_dir, "the device work areas")
        if len(parts) != 2 or not all(map(NAME.match, parts)):
            raise Refused(
                f"{raw} is not a disk's work area <instance>/<disk> of {self.devices_dir}"
            )
        check_root_tree(self.devices_dir)
        return path

    def work_area_entry(self, raw: str, entries: tuple[str, ...] = WORK_AREA_ENTRIES) -> Path:
        """`<devices_dir>/<instance>/<disk>/<entry>` with `entry` among `entries`."""
        path = _plain(raw)
        parts = _below(path, self.devices_dir, "the device work areas")
        if len(parts) != 3 or parts[2] not in entries or not all(map(NAME.match, parts[:2])):
            raise Refused(
                f"{raw} is not one of {', '.join(entries)} in a disk's work area under "
                f"{self.devices_dir}"
            )
        check_root_tree(self.devices_dir)
        return path

    def instance_disk(self, raw: str) -> Path:
        path = _plain(raw)
        parts = _below(path, self.instances_dir, "the instances directory")
        if len(parts) != 2 or not all(map(NAME.match, parts)):
            raise Refused(
                f"{raw} is not an instance disk <instance>/<disk> of {self.instances_dir}"
            )
        _regular_file(path)
        return path

    def cached_base(self, raw: str) -> Path:
        path = _plain(raw)
        parts = _below(path, self.cache_dir, "the image cache")
        if len(parts) != 1 or not NAME.match(parts[0]):
            raise Refused(f"{raw} is not an entry of the image cache {self.cache_dir}")
        _regular_file(path)
        return path

    def disk_bytes(self, raw: str) -> Path:
        """What a loop device or fuse2fs may open: an instance disk or a disk's FUSE export."""
        path = _plain(raw)
        if path.is_relative_to(self.devices_dir):
            return self.work_area_entry(raw, ("export",))
        return self.instance_disk(raw)

    def recorded_backing(self, raw: str) -> Path:
        """The backing file of a loop device this helper attached (its ledger and the kernel
        agree): checked by name only, an instance disk or a disk's export. The device holds the
        file it was attached to open, so whatever is at that name now (the worker may have put
        a link there) is not used; detaching or mounting the device never opens the name."""
        if not raw.startswith("/") or os.path.normpath(raw) != raw:
            raise Refused(f"{raw!r} is not an absolute, normal path")
        path = Path(raw)
        if path.is_relative_to(self.devices_dir):
            parts = _below(path, self.devices_dir, "the device work areas")
            valid = len(parts) == 3 and parts[2] == "export"
        else:
            parts = _below(path, self.instances_dir, "the instances directory")
            valid = len(parts) == 2
        if not valid or not all(map(NAME.match, parts[:2])):
            raise Refused(f"{raw} is neither an instance disk nor a disk's export")
        return path

    def mounted_guest(self, raw: str) -> Path:
        path = self.work_area_entry(raw, ("root",))
        if not mounts.is_mounted(path):
            raise Refused(f"nothing is mounted at {raw}")
        return path

    def filesystem(self, fstype: str) -> str:
        if fstype not in self.allowed_filesystems:
            raise Refused(f"filesystem {fstype} is not allowed here")
        return fstype


def check_root_tree(path: Path) -> None:
    """Refused unless only root can change `path` and every directory above it: each is a
    directory (not a link), owned by root, and writable by neither group nor others — except a
    root-owned sticky directory above `path` (like /tmp), where others cannot rename or remove
    what root owns. A few lstat(2) calls: cheap enough before every request."""
    current = Path("/")
    for part in (*path.parts[1:], None):
        try:
            status = current.lstat()
        except FileNotFoundError:
            raise Refused(f"{current} does not exist") from None
        writable = status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = status.st_mode & stat.S_ISVTX and part is not None
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != 0 or (writable and not sticky):
            raise Refused(
                f"{current} can be changed by a user other than root (owner uid "
                f"{status.st_uid}, mode {stat.filemode(status.st_mode)}): the device work areas "
                f"under {path} must be in a tree only root can change"
            )
        if part is None:
            return
        current = current / part


def _plain(raw: str) -> Path:
    """An absolute, normal path without symbolic links anywhere on it."""
    if not raw.startswith("/") or os.path.normpath(raw) != raw or "\0" in raw:
        raise Refused(f"{raw!r} is not an absolute, normal path")
    try:
        real = os.path.realpath(raw)
    except OSError as error:  # a link became something else while it was read (EINVAL)
        raise Refused(f"{raw} changed while it was checked: {error.strerror}") from None
    if real != raw:
        raise Refused(f"{raw} goes through a symbolic link")
    return Path(raw)


def _below(path: Path, root: Path, what: str) -> tuple[str, ...]:
    if not path.is_relative_to(root) or path == root:
        raise Refused(f"{path} is outside {what} ({root})")
    return path.relative_to(root).parts


def _regular_file(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise Refused(f"{path} does not exist") from None
    if not stat.S_ISREG(mode):
        raise Refused(f"{path} is not a regular file")
