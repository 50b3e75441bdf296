"""What domain code needs from the runtime, as protocols: every port of the domain.

Locks with a lease (`Lease`, `LockFactory`), progress reports (`Progress`), references to cached
bases (`References`), the device records of a host (`DeviceLedger`), the step journal
(`StepJournal`), the operations that need root (`PrivilegedOperations`: in process, or
worker.helper_client for the privileged helper) and, in host scope, the copies of cache entries
on peers (`PeerRegistry`). Domain functions take these as arguments; worker/ supplies the Redis
adapters
side by side (worker.redis_locks, worker.redis_references, worker.redis_ledger,
worker.redis_journal) and tests/fakes the in-memory ones. Nothing here imports Celery or Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from domain.core.device_records import DeviceRecord
from domain.core.journal import CanvasView, PlannedStep, StepState
from domain.core.peers import ImageDigests, PeerCopy

if TYPE_CHECKING:  # models import publish, which imports this module
    from domain.core.models import FileInjection, InjectedFile


class Lease(Protocol):
    """A lock held for a lease that is renewed while the holder works."""

    @property
    def fence(self) -> int:
        """A number that grows with every acquisition of any lock: recorded beside what the
        holder publishes, so a later reader can tell which holder wrote it."""
        ...

    def __enter__(self) -> Lease: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def ensure_held(self) -> None:
        """Raise LockLost unless this holder still owns the lock, and extend the lease so that
        it stays owned for the commit that follows (the fence before a rename)."""
        ...


LockFactory = Callable[[str], Lease]
"""Makes the lease lock for a resource name such as ``cache:<key>``."""


class Progress(Protocol):
    """Receives progress of a long step; implementations throttle as they see fit."""

    def __call__(self, done: int, total: int | None) -> None: ...


def no_progress(done: int, total: int | None) -> None:
    """A progress sink that ignores reports."""


class References(Protocol):
    """Which holders use each cached base, across every host: instance disks whose backing file
    it is, and pins of canvases between fetching the base and creating the disk."""

    def add(self, key: str, holder: str) -> None:
        """Record that `holder` uses the base `key` (idempotent)."""
        ...

    def discard(self, key: str, holder: str) -> None: ...

    def add_unless_evicting(self, key: str, holder: str) -> bool:
        """Atomically: record `holder` unless the cache manager is removing `key` right now
        (`begin_eviction` without `end_eviction` yet); whether it was recorded."""
        ...

    def begin_eviction(self, key: str, lease_seconds: float) -> bool:
        """Atomically: if nothing holds `key`, mark it as being removed (for at most
        `lease_seconds`) and return True; False when a holder appeared."""
        ...

    def end_eviction(self, key: str) -> None: ...

    def holders(self, key: str) -> dict[str, float]:
        """Each holder of `key` and when (epoch seconds) it was recorded."""
        ...

    def forget(self, holder: str) -> list[str]:
        """Drop `holder` from every base; the keys it held."""
        ...


class DeviceLedger(Protocol):
    """Records of one host's instance disks (worker.redis_ledger.RedisDeviceLedger)."""

    def claim(self, disk: str, owner: str, worker: str) -> DeviceRecord:
        """The record of `disk` for `owner`, created if there is none; DiskBusy when another
        owner holds it."""
        ...

    def get(self, disk: str) -> DeviceRecord | None: ...

    def put(self, record: DeviceRecord) -> None:
        """Store `record`, replacing the one of its disk."""
        ...

    def drop(self, disk: str, owner: str) -> None:
        """Remove the record of `disk` if `owner` still holds it."""
        ...

    def records(self) -> list[DeviceRecord]:
        """Every record of this host, for the janitor."""
        ...


class StepJournal(Protocol):
    """Which steps a canvas has, and when each started, ended, retried or failed; keyed by the
    canvas's root task id (the id the caller holds). Writes never fail a step."""

    def plan(
        self,
        root_id: str,
        steps: list[PlannedStep],
        *,
        done: Sequence[PlannedStep] = (),
        worker: str = "",
    ) -> None:
        """The canvas's steps, in order; `done`: steps found already done (recorded as
        succeeded)."""
        ...

    def started(self, root_id: str, task_id: str, name: str, worker: str) -> None: ...

    def finished(
        self, root_id: str, task_id: str, name: str, state: StepState, error: str | None = None
    ) -> None: ...

    def read(self, root_id: str) -> CanvasView | None: ...


class PrivilegedOperations(Protocol):
    """Everything the device steps do that needs root: loop devices, mounts (kernel and FUSE),
    the FUSE daemons' processes, and files written as root into a mounted guest.

    Device code calls these and nothing else for privileged work. domain.guest.privileged
    runs them in this process (a worker running as root); worker.helper_client sends each to the
    privileged helper (`helper/`), which checks every argument again against the configured
    roots and runs it with only the capabilities it needs."""

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


class Temporaries(Protocol):
    """Names a holder is about to create under a temporary name (an RBD image being imported or
    cloned), recorded before it creates them, so that the next holder of the resource's lease
    can remove what a holder that died left, without listing a whole pool
    (worker.redis_rbd.RedisTemporaries)."""

    def add(self, resource: str, name: str) -> None: ...

    def discard(self, resource: str, name: str) -> None: ...

    def members(self, resource: str) -> list[str]: ...


class ImportedImages(Protocol):
    """The images imported into Ceph clusters, by `<fsid>/<pool>/<image>`: each one's record
    (what its `imgprep.record` image-meta says, so that a prepare finds it without asking the
    cluster) and when it was last used (a prepare asked for it, one of its clones was removed),
    which aging measures the unused window from (worker.redis_rbd.RedisImportedImages)."""

    def remember(self, resource: str, record: str) -> None: ...

    def recall(self, resource: str) -> str | None: ...

    def touch(self, resource: str) -> None: ...

    def last_used(self, resource: str) -> float | None: ...

    def forget(self, resource: str) -> None:
        """Drop the record and the last use (the image is gone)."""
        ...


class PeerRegistry(Protocol):
    """Which hosts hold (or are fetching) each cache entry, and the digests it is verified
    against (host scope; worker.redis_peers.RedisPeerRegistry)."""

    def copies(self, key: str) -> list[PeerCopy]:
        """Every host's copy of `key`, complete or in progress."""
        ...

    def copy(self, key: str, host: str) -> PeerCopy | None: ...

    def announce(self, key: str, copy: PeerCopy) -> None:
        """Record `copy` (replacing the host's previous one)."""
        ...

    def progress(self, key: str, host: str, fence: int, size: int) -> None:
        """The host's copy in progress (the one with `fence`) now has `size` bytes on disk."""
        ...

    def withdraw(self, key: str, host: str) -> None: ...

    def digests(self, key: str) -> ImageDigests | None: ...

    def record_digests(self, key: str, digests: ImageDigests) -> None:
        """Record what a verifying host found (replacing what was there)."""
        ...
