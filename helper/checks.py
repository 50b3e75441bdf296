"""Every argument of every request, checked again against the helper's own roots.

The helper trusts nothing its caller says: a worker runs unprivileged and takes its instructions
from a broker any host of the fleet can write to. Paths must be absolute, normal (no `.`, `..`
or doubled slashes), free of symbolic links from `/` down (their real path is themselves), and
exactly where imgprep puts that kind of thing:

* a disk's work area: `<state_dir>/devices/<instance>/<disk>`, and in it the mount point
  `root`, the FUSE export `export` and the daemon's pid file `storage-daemon.pid`;
* an instance disk: `<instances_dir>/<instance>/<disk>`, a regular file;
* a cached base: `<cache_dir>/<key>`, a regular file;
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

    @classmethod
    def of(
        cls, cache_dir: Path, instances_dir: Path, state_dir: Path, filesystems: tuple[str, ...]
    ) -> Roots:
        return cls(
            Path(os.path.realpath(cache_dir)),
            Path(os.path.realpath(instances_dir)),
            Path(os.path.realpath(state_dir)),
            filesystems,
        )

    @property
    def devices_dir(self) -> Path:
        return self.state_dir / "devices"

    # -- kinds of path ---------------------------------------------------------------------------

    def work_area_entry(self, raw: str, entries: tuple[str, ...] = WORK_AREA_ENTRIES) -> Path:
        """`<state_dir>/devices/<instance>/<disk>/<entry>` with `entry` among `entries`."""
        path = _plain(raw)
        parts = _below(path, self.devices_dir, "the device work areas")
        if len(parts) != 3 or parts[2] not in entries or not all(map(NAME.match, parts[:2])):
            raise Refused(
                f"{raw} is not one of {', '.join(entries)} in a disk's work area under "
                f"{self.devices_dir}"
            )
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

    def mounted_guest(self, raw: str) -> Path:
        path = self.work_area_entry(raw, ("root",))
        if not mounts.is_mounted(path):
            raise Refused(f"nothing is mounted at {raw}")
        return path

    def filesystem(self, fstype: str) -> str:
        if fstype not in self.allowed_filesystems:
            raise Refused(f"filesystem {fstype} is not allowed here")
        return fstype


def _plain(raw: str) -> Path:
    """An absolute, normal path without symbolic links anywhere on it."""
    if not raw.startswith("/") or os.path.normpath(raw) != raw or "\0" in raw:
        raise Refused(f"{raw!r} is not an absolute, normal path")
    if os.path.realpath(raw) != raw:
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
