"""The privileged operations run in this process: what a worker running as root does, and what
the privileged helper (`helper/`) runs once it has checked a request and dropped to the
operation's capabilities.

Each method is one tool call (domain.guest.tools) or the guest writer
(domain.guest.guest_writes); none of them decides anything about disks, records or paths: the
device steps decide, and the helper checks again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from domain.core.models import FileInjection, InjectedFile
from domain.core.runner import Runner
from domain.guest import guest_writes, work_areas
from domain.guest.held_files import fd_path, held
from domain.guest.tools import daemons, fuse2fs, fuse_as_user, losetup, storage_daemon
from domain.guest.tools import mount as mounts

KERNEL_OPTIONS = "nosuid,nodev,noexec"
# A journal is never loaded by a kernel mount: an ext3/4 superblock can name its journal's
# device (by number), which the kernel would open and replay from. A filesystem that needs its
# journal replayed is refused before it gets here (FilesystemNeedsRecovery), and with noload a
# superblock rewritten to need it afterwards is refused by the kernel.
NO_JOURNAL = {"ext3": ",noload", "ext4": ",noload"}


class InProcessPrivileged:
    """PrivilegedOperations in the calling process (which must hold the privileges).

    `export_owner` (uid, gid): the user that reads the FUSE exports besides root (the workers'
    user, when this runs in the privileged helper): each export is mounted with allow_other and
    handed to that user (mode 0600), so the unprivileged worker can read its partition table.

    `file_owners`: whose files (instance disks, cache entries, exports) the tools may be given,
    when the caller is not trusted (the helper: root and the workers' user). Each such file is
    then opened here without following any link and handed to the tool as a descriptor
    (domain.guest.held_files); None (a worker running as root): opened as before.

    `handoff` (with `export_owner` and `file_owners`: the helper): the FUSE daemons, which parse
    bytes the worker controls and follow names written in them, run as `export_owner`, and this
    process only mounts their FUSE connection (domain.guest.tools.fuse_as_user)."""

    def __init__(
        self,
        runner: Runner,
        export_owner: tuple[int, int] | None = None,
        file_owners: frozenset[int] | None = None,
        *,
        handoff: Path | None = None,
    ) -> None:
        self.runner = runner
        self.export_owner = export_owner
        self.file_owners = file_owners
        self.handoff = handoff

    @property
    def _daemon_user(self) -> tuple[fuse_as_user.User, Path, frozenset[int]] | None:
        """Who the FUSE daemons run as, their handoff and whose files they may open; None: as
        this process (a worker running as root)."""
        if self.export_owner is None or self.handoff is None or self.file_owners is None:
            return None
        return fuse_as_user.User(*self.export_owner), self.handoff, self.file_owners

    def attach_loop(self, backing: Path, *, offset: int, size: int) -> str:
        with held(backing, write=True, owners=self.file_owners) as fd:
            return losetup.attach_fd(fd, offset=offset, size=size, name=str(backing))

    def detach_loop(self, device: str) -> None:
        losetup.detach(self.runner, device)

    def mount_fuse2fs(self, image: Path, target: Path, *, offset: int) -> None:
        work_areas.make_mount_point(target)
        if (as_user := self._daemon_user) is not None:
            user, handoff, owners = as_user
            fuse2fs.mount_as_user(
                image, target, offset=offset, user=user, handoff=handoff, owners=owners
            )
            return
        with held(image, write=True, owners=self.file_owners) as fd:
            fuse2fs.mount(self.runner, fd_path(fd), target, offset=offset, pass_fds=(fd,))

    def mount_kernel(self, device: str, target: Path, *, fstype: str) -> None:
        work_areas.make_mount_point(target)
        options = KERNEL_OPTIONS + NO_JOURNAL.get(fstype, "")
        mounts.mount(self.runner, device, target, fstype=fstype, options=options)

    def unmount(self, target: Path) -> None:
        mounts.unmount(self.runner, target)

    def is_live_mount(self, target: Path) -> bool:
        if not mounts.is_mounted(target):
            return False
        try:
            os.statvfs(target)
        except OSError:
            return False
        return True

    def start_storage_daemon(
        self,
        overlay: Path,
        *,
        backing: Path | None,
        backing_format: str | None,
        export: Path,
        pidfile: Path,
    ) -> None:
        work_areas.make_export(export)
        if (as_user := self._daemon_user) is not None:
            user, handoff, owners = as_user
            storage_daemon.start_as_user(
                overlay,
                backing=backing,
                backing_format=backing_format,
                export=export,
                pidfile=pidfile,
                user=user,
                handoff=handoff,
                owners=owners,
            )
            return
        with contextlib.ExitStack() as files:
            disk = files.enter_context(held(overlay, write=True, owners=self.file_owners))
            base = (
                None
                if backing is None
                else files.enter_context(held(backing, write=False, owners=self.file_owners))
            )
            storage_daemon.start(
                self.runner,
                fd_path(disk),
                backing=None if base is None else fd_path(base),
                backing_format=backing_format,
                export=export,
                pidfile=pidfile,
                allow_other=self.export_owner is not None,
                pass_fds=(disk,) if base is None else (disk, base),
            )
        if self.export_owner is not None:  # a FUSE setattr: the daemon keeps mode 0600
            os.chown(export, *self.export_owner)

    def start_rbd_export(
        self,
        *,
        pool: str,
        image: str,
        conf: Path,
        user: str,
        keyring: Path | None,
        export: Path,
        pidfile: Path,
    ) -> None:
        node = storage_daemon.RbdNode(pool=pool, image=image, conf=conf, user=user, keyring=keyring)
        work_areas.make_export(export)
        if (as_user := self._daemon_user) is not None:
            daemon_user, handoff, owners = as_user
            storage_daemon.start_rbd_as_user(
                node,
                export=export,
                pidfile=pidfile,
                user=daemon_user,
                handoff=handoff,
                owners=owners,
            )
            return
        storage_daemon.start_rbd(
            self.runner,
            node,
            export=export,
            pidfile=pidfile,
            allow_other=self.export_owner is not None,
        )
        if self.export_owner is not None:
            os.chown(export, *self.export_owner)

    def make_work_area(self, area: Path) -> None:
        work_areas.make(area, None if self.export_owner is None else self.export_owner[1])

    def remove_work_area(self, area: Path) -> bool:
        return work_areas.remove(area)

    def stop_daemons(self, program: str, path: Path, *, timeout: float) -> list[int]:
        return daemons.stop(daemons.find(program, path), timeout)

    def kill_daemons(self, program: str, path: Path) -> list[int]:
        return daemons.kill(daemons.find(program, path))

    def write_files(
        self,
        root: Path,
        files: Sequence[FileInjection],
        *,
        disk: str,
        use_openat2: bool | None = None,
    ) -> list[InjectedFile]:
        return guest_writes.write_files(root, files, disk=disk, use_openat2=use_openat2)
