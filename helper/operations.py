"""One entrypoint per operation: the capabilities it holds, the check of its arguments, and what
it runs.

Nova marks each privileged function with a privsep context that names its capabilities
(`sys_admin_pctxt`: CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_NET_ADMIN,
CAP_SYS_ADMIN for all of them). Here each operation has its own, smallest set, and runs in a
child process that holds nothing else (helper.zygote): what it executes inherits at most that
set, because the rest is gone from the bounding set too.

`check` runs in the server (root, before the child exists) and raises Refused; `run` runs in the
child, with the checked request, through domain.guest.privileged.InProcessPrivileged. A checked
path of the worker's (an instance disk, a cache entry) can still be swapped for a link by the
worker before the tool runs: the child opens such files itself, without following links, and
hands the tools descriptors; paths in the devices tree cannot change under it (only root can
change that tree).

No tool that parses bytes the worker controls runs with root's rights: the FUSE daemons
(qemu-storage-daemon, fuse2fs) follow names written inside those bytes (a qcow2 external data
file, an ext4 journal device), so they run as the workers' user, and the child only mounts
their FUSE connection (domain.guest.tools.fuse_as_user). The loop driver parses nothing; a
kernel mount (only with `mount.kernel_mount` allowing it) hands the guest's filesystem to the
host kernel, with ext3/4 journals never loaded (README, "Privileges").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domain.core.runner import Runner
from domain.guest.privileged import InProcessPrivileged
from domain.guest.tools import daemons
from helper import capabilities as caps
from helper.checks import Refused, Roots
from helper.loop_ledger import LoopLedger
from helper.protocol import (
    AttachLoop,
    DetachLoop,
    IsLiveMount,
    KillDaemons,
    MakeWorkArea,
    MountFuse2fs,
    MountKernel,
    Ping,
    RemoveWorkArea,
    Reply,
    Request,
    StartRbdExport,
    StartStorageDaemon,
    StopDaemons,
    Unmount,
    WriteFiles,
)

# The capabilities of each operation (README, "Privileges").
CAPABILITIES: dict[str, tuple[int, ...]] = {
    # LOOP_CTL_GET_FREE/LOOP_CONFIGURE; open the worker's disk or the export read-write (itself,
    # without following links, domain.guest.held_files)
    "attach_loop": (caps.CAP_SYS_ADMIN, caps.CAP_DAC_OVERRIDE),
    "detach_loop": (caps.CAP_SYS_ADMIN,),
    # the FUSE mount(2) and the daemon's own mount namespace; fuse2fs runs as the workers'
    # user (setuid, setgid), which opens the disk: it parses guest bytes
    "mount_fuse2fs": (caps.CAP_SYS_ADMIN, caps.CAP_SETUID, caps.CAP_SETGID),
    # mount(2), umount(2): the mount points are in root's devices tree (0755), so looking them
    # up needs no capability
    "mount_kernel": (caps.CAP_SYS_ADMIN,),
    "unmount": (caps.CAP_SYS_ADMIN,),
    # statvfs(2) of a FUSE mount answers only its mounter's uid (root, which the child keeps)
    # with the truth; the path is in root's tree
    "is_live_mount": (),
    # the export's FUSE mount(2) and the daemon's own mount namespace; qemu-storage-daemon runs
    # as the workers' user (setuid, setgid), which opens the overlay and owns the export: it
    # parses qcow2 headers, which name files
    "start_storage_daemon": (caps.CAP_SYS_ADMIN, caps.CAP_SETUID, caps.CAP_SETGID),
    # the same for an RBD image: the daemon, as the workers' user, reads their Ceph key and
    # talks to the cluster; root mounts its export and opens no file of the worker's
    "start_rbd_export": (caps.CAP_SYS_ADMIN, caps.CAP_SETUID, caps.CAP_SETGID),
    # the daemons run as the workers' user: signalling them from root needs CAP_KILL (they are
    # found by their command line naming a work area, never by a pid from the caller)
    "stop_daemons": (caps.CAP_KILL,),
    "kill_daemons": (caps.CAP_KILL,),
    # root's own directories in root's devices tree (helper.checks.check_root_tree): uid 0
    # owns them; the area's group becomes the workers' (0750: they enter, others do not)
    "make_work_area": (caps.CAP_CHOWN,),
    "remove_work_area": (),
    # files owned by root, in guest directories owned by anyone, with any mode
    "write_files": (caps.CAP_DAC_OVERRIDE, caps.CAP_CHOWN, caps.CAP_FOWNER),
    "ping": (),
}
DAEMON_ENTRY = {"fuse2fs": "root", "qemu-storage-daemon": "export"}


@dataclass(frozen=True)
class Workers:
    """The workers' user: whose files the tools may be given, who owns the FUSE exports, and
    who the FUSE daemons run as (started through `handoff`, fuse_as_user's script)."""

    uid: int
    gid: int
    handoff: Path


@dataclass(frozen=True)
class Checked:
    """A request the server will run, and what to note in the loop ledger around it."""

    request: Request
    loop: tuple[str, int] | None = None  # (backing, offset) attached or detached


def check(request: Request, roots: Roots, loops: LoopLedger) -> Checked:  # noqa: PLR0911, PLR0912 - one branch per operation
    """Refused unless every argument is where imgprep keeps such things."""
    match request:
        case AttachLoop():
            return Checked(request, (str(roots.disk_bytes(request.backing)), request.offset))
        case DetachLoop():
            backing, offset = loops.recorded(request.device)
            roots.recorded_backing(backing)
            return Checked(request, (backing, offset))
        case MountFuse2fs():
            roots.disk_bytes(request.image)
            roots.work_area_entry(request.target, ("root",))
            return Checked(request)
        case MountKernel():
            roots.recorded_backing(loops.recorded(request.device)[0])
            roots.work_area_entry(request.target, ("root",))
            roots.filesystem(request.fstype)
            return Checked(request)
        case Unmount() | IsLiveMount():
            roots.work_area_entry(request.target, ("root", "export"))
            return Checked(request)
        case StartStorageDaemon():
            roots.instance_disk(request.overlay)
            if request.backing is not None:
                roots.cached_base(request.backing)
            export = roots.work_area_entry(request.export, ("export",))
            pidfile = roots.work_area_entry(request.pidfile, ("storage-daemon.pid",))
            if export.parent != pidfile.parent:
                raise Refused("the export and the pid file are in different work areas")
            return Checked(request)
        case StartRbdExport():
            export = roots.work_area_entry(request.export, ("export",))
            pidfile = roots.work_area_entry(request.pidfile, ("storage-daemon.pid",))
            if export.parent != pidfile.parent:
                raise Refused("the export and the pid file are in different work areas")
            return Checked(request)
        case StopDaemons() | KillDaemons():
            roots.work_area_entry(request.path, (DAEMON_ENTRY[request.program],))
            return Checked(request)
        case MakeWorkArea() | RemoveWorkArea():
            roots.work_area(request.path)
            return Checked(request)
        case WriteFiles():
            roots.mounted_guest(request.root)
            return Checked(request)
        case Ping():
            return Checked(request)
    raise Refused(f"unknown operation {request!r}")  # pragma: no cover - the union is closed


def run(  # noqa: PLR0911, PLR0912 - one branch per operation
    request: Request, timeout: float, workers: Workers | None = None
) -> Reply:
    """Run a checked request in this (child) process."""
    # the worker's files are opened without following links, and only if root or it owns them
    owners = frozenset({0} if workers is None else {0, workers.uid})
    ops = InProcessPrivileged(
        Runner(default_timeout=timeout),
        None if workers is None else (workers.uid, workers.gid),
        owners,
        handoff=None if workers is None else workers.handoff,
    )
    match request:
        case AttachLoop():
            device = ops.attach_loop(
                Path(request.backing), offset=request.offset, size=request.size
            )
            return Reply(ok=True, result=device)
        case DetachLoop():
            ops.detach_loop(request.device)
        case MountFuse2fs():
            ops.mount_fuse2fs(Path(request.image), Path(request.target), offset=request.offset)
        case MountKernel():
            ops.mount_kernel(request.device, Path(request.target), fstype=request.fstype)
        case Unmount():
            ops.unmount(Path(request.target))
        case IsLiveMount():
            return Reply(ok=True, result=ops.is_live_mount(Path(request.target)))
        case StartStorageDaemon():
            ops.start_storage_daemon(
                Path(request.overlay),
                backing=Path(request.backing) if request.backing else None,
                backing_format=request.backing_format,
                export=Path(request.export),
                pidfile=Path(request.pidfile),
            )
        case StartRbdExport():
            ops.start_rbd_export(
                pool=request.pool,
                image=request.image,
                conf=Path(request.conf),
                user=request.user,
                keyring=Path(request.keyring) if request.keyring else None,
                export=Path(request.export),
                pidfile=Path(request.pidfile),
            )
        case StopDaemons():
            pids = daemons.find(request.program, Path(request.path))
            return Reply(ok=True, result=daemons.stop(pids, request.timeout))
        case KillDaemons():
            return Reply(
                ok=True, result=daemons.kill(daemons.find(request.program, Path(request.path)))
            )
        case MakeWorkArea():
            ops.make_work_area(Path(request.path))
        case RemoveWorkArea():
            return Reply(ok=True, result=ops.remove_work_area(Path(request.path)))
        case WriteFiles():
            written = ops.write_files(
                Path(request.root),
                request.files,
                disk=request.disk,
                use_openat2=request.use_openat2,
            )
            return Reply(ok=True, result=written)
        case Ping():
            pass
    return Reply(ok=True)
