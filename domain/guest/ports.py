"""What the device steps need to run as root, as a protocol (`PrivilegedOperations`): in
process (domain.guest.privileged), or through the privileged helper
(worker.privileges.helper_client).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from domain.core.models import FileInjection, InjectedFile


class PrivilegedOperations(Protocol):
    """Everything the device steps do that needs root: loop devices, mounts (kernel and FUSE),
    the FUSE daemons' processes, and files written as root into a mounted guest.

    Device code calls these and nothing else for privileged work. domain.guest.privileged
    runs them in this process (a worker running as root); worker.privileges.helper_client sends
    each to the privileged helper (`helper/`), which checks every argument again against the
    configured roots and runs it with only the capabilities it needs."""

    def attach_loop(self, backing: Path, *, offset: int, size: int) -> str:
        """A free loop device over `size` bytes of `backing` from `offset`; its /dev path.
        NoFreeDevice when none is free."""
        ...

    def detach_loop(self, device: str) -> None: ...

    def mount_fuse2fs(self, image: Path, target: Path, *, offset: int) -> None:
        """Mount the ext filesystem at `offset` of `image` on `target` (created if missing)."""
        ...

    def mount_kernel(self, device: str, target: Path, *, fstype: str) -> None:
        """Mount `device` at `target` (created if missing) with nosuid,nodev,noexec."""
        ...

    def unmount(self, target: Path) -> None:
        """DeviceBusy when the mount is still in use."""
        ...

    def is_live_mount(self, target: Path) -> bool:
        """Mounted and answering (a FUSE mount whose daemon died is not live)."""
        ...

    def start_storage_daemon(
        self,
        overlay: Path,
        *,
        backing: Path | None,
        backing_format: str | None,
        export: Path,
        pidfile: Path,
    ) -> None:
        """Export the qcow2 `overlay` as a raw file at `export` (created if missing;
        qemu-storage-daemon, FUSE)."""
        ...

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
        """Export the RBD image `pool/image` of the cluster `conf` names, as cephx `user` with
        `keyring`, as a raw file at `export` (qemu-storage-daemon's rbd driver, FUSE)."""
        ...

    def stop_daemons(self, program: str, path: Path, *, timeout: float) -> list[int]:
        """SIGTERM the `program` processes serving `path`, SIGKILL those still running after
        `timeout`; the pids that had to be killed."""
        ...

    def kill_daemons(self, program: str, path: Path) -> list[int]:
        """SIGKILL the `program` processes serving `path`; the pids killed."""
        ...

    def write_files(
        self,
        root: Path,
        files: Sequence[FileInjection],
        *,
        disk: str,
        use_openat2: bool | None = None,
    ) -> list[InjectedFile]:
        """Write `files` (owner root) under the mounted guest root `root`, never outside it."""
        ...

    def make_work_area(self, area: Path) -> None:
        """Create the work area `<devices_dir>/<instance>/<disk>` of an instance disk; the
        mount point and the export inside are made by the operations that mount on them."""
        ...

    def remove_work_area(self, area: Path) -> bool:
        """Remove the work area and what imgprep put in it; DeviceBusy while something is
        mounted there; False when it holds something else (left in place)."""
        ...
