"""fuse2fs(1): an ext2/3/4 filesystem inside an image file, mounted by a userspace process.

The guest filesystem is parsed by fuse2fs (e2fsprogs' library), never by the host kernel's
ext4 driver, and no loop device is needed: `-o offset=BYTES` starts at the partition. fuse2fs
detaches into the background once the mount is live; after an unmount it writes its last
changes and exits, so callers wait for its process (domain.guest.tools.daemons).
"""

from __future__ import annotations

from pathlib import Path

from domain.core.runner import Runner

FUSE2FS = "fuse2fs"
# Userspace ext drivers parse these; nothing else has one here.
FILESYSTEMS = frozenset({"ext2", "ext3", "ext4"})


def mount(
    runner: Runner, image: Path, target: Path, *, offset: int, pass_fds: tuple[int, ...] = ()
) -> None:
    """`image` may be `/proc/self/fd/N` of a descriptor in `pass_fds` (fuse2fs opens that name
    as it is, which reopens the same file)."""
    options = f"offset={offset},nosuid,nodev,noexec"
    runner.run([FUSE2FS, str(image), str(target), "-o", options], timeout=120, pass_fds=pass_fds)
