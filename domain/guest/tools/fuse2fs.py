"""fuse2fs(1): an ext2/3/4 filesystem inside an image file, mounted by a userspace process.

The guest filesystem is parsed by fuse2fs (e2fsprogs' library), never by the host kernel's
ext4 driver, and no loop device is needed: `-o offset=BYTES` starts at the partition. fuse2fs
detaches into the background once the mount is live; after an unmount it writes its last
changes and exits, so callers wait for its process (domain.guest.tools.daemons).

A superblock that says its journal needs recovery makes fuse2fs look up the journal's device by
the UUID the superblock names, among the host's block devices, and replay it: a name written in
guest bytes. With the privileged helper, `mount_as_user` runs fuse2fs as the workers' user
(domain.guest.tools.fuse_as_user), which can open no host block device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from domain.core.runner import Runner
from domain.guest.tools import fuse_as_user

FUSE2FS = "fuse2fs"
# Userspace ext drivers parse these; nothing else has one here.
FILESYSTEMS = frozenset({"ext2", "ext3", "ext4"})


def mount(
    runner: Runner, image: Path, target: Path, *, offset: int, pass_fds: tuple[int, ...] = ()
) -> None:
    """`image` may be `/proc/self/fd/N` of a descriptor in `pass_fds` (fuse2fs opens that name
    as it is, which reopens the same file)."""
    runner.run(_argv(image, target, offset), timeout=120, pass_fds=pass_fds)


def mount_as_user(
    image: Path,
    target: Path,
    *,
    offset: int,
    user: fuse_as_user.User,
    handoff: Path,
    owners: frozenset[int],
    timeout: float = 120,
) -> None:
    """Mount as `mount` does, with fuse2fs running as `user` (the workers') and root (this
    process) making only the FUSE mount: `image` is opened as that user, without following
    links."""

    def argv(paths: Sequence[Path]) -> list[str]:
        return _argv(paths[0], target, offset)

    fuse_as_user.start(
        argv,
        files=[fuse_as_user.HeldFile(image, write=True)],
        mount_point=target,
        user=user,
        handoff=handoff,
        owners=owners,
        timeout=timeout,
    )


def _argv(image: Path, target: Path, offset: int) -> list[str]:
    return [FUSE2FS, str(image), str(target), "-o", f"offset={offset},nosuid,nodev,noexec"]
