"""FUSE daemons that run as the workers' user, for which root performs only the mount.

qemu-storage-daemon and fuse2fs parse bytes the worker controls, and both open files those bytes
name: a qcow2 header names an external data file (which qemu opens whatever nodes it is given),
an ext3/4 superblock with `needs_recovery` names a journal device by UUID (which fuse2fs finds
among the host's block devices and replays). Run by the privileged helper as root, with the
capabilities to read and write any file, they read and wrote what the worker named: a root-only
file through a qcow2 data file, a host block device as a journal. A check of the bytes first
cannot close that: the worker owns the file and can rewrite it between the check and the open.

So under privilege separation these daemons run as the workers' user: no capabilities, no
supplementary groups, `no_new_privs`. Whatever name the bytes hold is then opened with exactly
the worker's rights, which is nothing the worker could not open itself. Root keeps the one thing
only it may do here: mount(2) the FUSE connection on the work area's path, in root's tree.

How the daemon gets its mount without privileges: libfuse, when it cannot mount itself, runs
fusermount(1) with a socket in `_FUSE_COMMFD` and expects the opened /dev/fuse descriptor back
over it (libfuse 2 and 3 alike; this is fusermount's documented protocol). `start` forks the
daemon into a mount namespace of its own, where /usr/bin/fusermount3 (which /bin/fusermount
names too) is the handoff script written by `install_handoff`, and /dev/fuse is /dev/null, so
that libfuse's own mount attempt fails (EPERM) and it asks "fusermount". The child drops to the
user and execs the daemon. The handoff script, run by libfuse as the user, sends its arguments
to the root process that forked the daemon, over a socketpair inherited as
`IMGPREP_FUSE_CHANNEL`. That process (`_serve_mount`) checks that the mount point is the one it
was given, opens /dev/fuse, mounts it there itself (nosuid, nodev, noexec, allow_other, owned
by the user: it chooses the options, taking only `default_permissions`, `max_read` and `ro`
from the request) and sends the descriptor back; the script hands it to libfuse. It serves one
mount, then waits for the daemon's first process to exit, as the daemon forks into the
background once its filesystem is served. An unmount asked of the script (`-u`) is a no-op:
the helper unmounts (teardown), which ends the daemon.

The daemon's namespace is a slave of the host's, so the mount the root process makes is the
host's and the daemon sees it as everyone does. A new namespace starts with a copy of every mount
the host has, and a copy keeps its filesystem mounted: where the host's mounts do not propagate
(private, as outside systemd), another disk's guest mount or export, unmounted by the helper in the
host, would live on in this daemon's namespace, its own FUSE daemon never told to exit (seen in
the fault campaign: teardowns waited for one another until a daemon was killed). So the namespace
lets go of every FUSE mount and every mount of a loop device it copied (what imgprep mounts), after
the daemon's files are opened (as the user, then root again) and before the daemon runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import structlog

from domain.core.errors import DeviceError, ImgprepError, PrivilegeRefused
from domain.core.runner import BASE_ENV, CommandError, CommandResult, describe_failure
from domain.guest.held_files import open_held
from domain.guest.tools.mount import unescape_mount_point

log = structlog.get_logger(__name__)

CHANNEL_ENV = "IMGPREP_FUSE_CHANNEL"
HANDOFF = "fusermount-handoff"
# What libfuse 3 (qemu-storage-daemon) and libfuse 2 (fuse2fs) execute to mount: on Debian
# /bin/fusermount is a link to fusermount3, and /bin is /usr/bin.
FUSERMOUNT = ("/usr/bin/fusermount3", "/usr/bin/fusermount", "/bin/fusermount3", "/bin/fusermount")
EXIT_REFUSED = 121  # the forked child refused before exec; the reason is on its stderr
REFUSED_PREFIX = "imgprep-refused "

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_SLAVE = 4096, 16384, 1 << 19
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)

# The handoff script: run by libfuse as the workers' user in the daemon's namespace, with only
# the standard library (-I: no environment or user site; -S: no site-packages).
HANDOFF_SCRIPT = """#!{python} -IS
# fusermount for a FUSE daemon imgprep's privileged helper runs as the workers' user
# (domain/guest/tools/fuse_as_user.py): the helper mounts; this hands libfuse the descriptor.
import json, os, socket, sys
args = sys.argv[1:]
if "-u" in args or "--unmount" in args:
    sys.exit(0)  # the helper unmounts
channel = socket.socket(fileno=int(os.environ["{channel}"]))
channel.sendall(json.dumps(args).encode())
reply, fds, _, _ = socket.recv_fds(channel, 65536, 1)
if not fds:
    sys.stderr.write("fusermount: " + reply.decode() + "\\n")
    sys.exit(1)
socket.send_fds(socket.socket(fileno=int(os.environ["_FUSE_COMMFD"])), [b"\\0"], fds)
"""


@dataclass(frozen=True)
class User:
    """The user a daemon runs as."""

    uid: int
    gid: int


Inspect = Callable[[int], None]


@dataclass(frozen=True)
class HeldFile:
    """A file the daemon is given open (as `/proc/self/fd/N`), opened as the user, without
    following links, and checked by `inspect` (which raises an ImgprepError to refuse it)."""

    path: Path
    write: bool
    inspect: Inspect | None = None


def install_handoff(directory: Path, python: str = sys.executable) -> Path:
    """Write the handoff script into `directory` (root's own, which the user may search) if it
    is not there as it should be; its path."""
    script = directory / HANDOFF
    content = HANDOFF_SCRIPT.format(python=python, channel=CHANNEL_ENV)
    with contextlib.suppress(FileNotFoundError):
        if script.read_text() == content and stat.S_IMODE(script.stat().st_mode) == 0o755:
            return script
    temporary = directory / f".{HANDOFF}.{os.getpid()}"
    temporary.write_text(content)
    temporary.chmod(0o755)
    temporary.replace(script)
    return script


def start(
    argv: Callable[[Sequence[Path]], list[str]],
    *,
    files: Sequence[HeldFile],
    mount_point: Path,
    user: User,
    handoff: Path,
    owners: frozenset[int],
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Start a FUSE daemon as `user`, mounted by this process at `mount_point`; `env`: what its
    environment has beside the runner's fixed one (an RBD export's CEPH_ARGS).

    `argv(paths)`: the daemon's command line, given the names (`/proc/self/fd/N`) of `files` as
    the daemon's process holds them. Returns once the daemon serves its mount and its first
    process has exited; the refusal of a file is PrivilegeRefused, a daemon that fails is a
    CommandError, and either way nothing is left mounted."""
    ours, theirs = socket.socketpair()
    errors_read, errors_write = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child, which execs or exits
        ours.close()
        os.close(errors_read)
        _become_daemon(
            argv, files, user, handoff, owners, theirs.fileno(), errors_write, dict(env or {})
        )
    theirs.close()
    os.close(errors_write)
    mounted = False
    try:
        with ours:
            mounted = _serve_mount(ours, pid, mount_point, user, started + timeout)
            status = _wait(pid, started + timeout)
        errors = _read_all(errors_read, started + timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        if mounted:
            _detach(mount_point)
        raise
    finally:
        os.close(errors_read)
    result = CommandResult(
        argv=tuple(argv([Path("/proc/self/fd/N")] * len(files))),
        returncode=os.waitstatus_to_exitcode(status),
        stdout="",
        stderr=errors,
        seconds=time.monotonic() - started,
    )
    if result.returncode == EXIT_REFUSED and errors.startswith(REFUSED_PREFIX):
        if mounted:
            _detach(mount_point)
        raise PrivilegeRefused(errors.removeprefix(REFUSED_PREFIX).strip())
    if result.returncode != 0 or not mounted:
        if mounted:
            _detach(mount_point)
        why = describe_failure(result)
        if result.returncode == 0:
            said = errors.strip().splitlines()[-1:] or ["no error output"]
            why = f"{result.argv[0]} exited without mounting {mount_point}: {said[0]}"
        raise CommandError(why, result)
    log.debug("fuse_daemon_started", argv=list(result.argv), uid=user.uid, seconds=result.seconds)
    return result


def _become_daemon(  # noqa: PLR0917 - the forked child's whole context, passed once
    argv: Callable[[Sequence[Path]], list[str]],
    files: Sequence[HeldFile],
    user: User,
    handoff: Path,
    owners: frozenset[int],
    channel: int,
    errors: int,
    extra_env: dict[str, str],
) -> NoReturn:
    """In the forked child: a namespace of its own, the user's rights, the files, exec."""
    try:
        os.dup2(errors, 2)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.setgroups([])
        os.setresgid(user.gid, user.gid, user.gid)
        # the files are opened as the user (its rights decide), and before the namespace lets go
        # of its copies of the host's FUSE mounts (an export among them); root again after
        os.setresuid(-1, user.uid, -1)
        held: list[int] = []
        for wanted in files:
            fd = open_held(wanted.path, write=wanted.write, owners=owners)
            if wanted.inspect is not None:
                wanted.inspect(fd)
            os.set_inheritable(fd, True)
            held.append(fd)
        os.setresuid(-1, 0, -1)
        _private_fusermount(handoff)
        os.setresuid(user.uid, user.uid, user.uid)  # every capability is gone with uid 0
        _call(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        os.set_inheritable(channel, True)
        keep = {0, 1, 2, channel, *held}
        for fd in _open_descriptors():
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        command = argv([Path(f"/proc/self/fd/{fd}") for fd in held])
        env = {**extra_env, **BASE_ENV, CHANNEL_ENV: str(channel)}
        os.execvpe(command[0], command, env)  # noqa: S606 - an argument list, as the runner's
    except ImgprepError as error:
        os.write(2, f"{REFUSED_PREFIX}{error}".encode())
        os._exit(EXIT_REFUSED)
    except BaseException as error:  # any failure before exec: the parent reports it
        with contextlib.suppress(OSError):
            os.write(2, f"could not start the FUSE daemon: {error}".encode())
    os._exit(127)


def _private_fusermount(handoff: Path) -> None:
    """A mount namespace of this process's own, in which fusermount is the handoff script and
    /dev/fuse cannot be used to mount."""
    _call(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _call(_libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "making / a slave")
    for copied in reversed(_pinning_mounts()):  # the deepest first
        _libc.umount2(copied, MNT_DETACH)  # a parent's detach may have taken it already
    targets = {os.path.realpath(p) for p in FUSERMOUNT if os.path.lexists(p)}
    for target in sorted(t for t in targets if os.path.isfile(t)):
        _call(
            _libc.mount(os.fsencode(handoff), os.fsencode(target), None, MS_BIND, None),
            f"binding the handoff over {target}",
        )
    if os.path.exists("/dev/fuse"):
        _call(
            _libc.mount(b"/dev/null", b"/dev/fuse", None, MS_BIND, None),
            "binding /dev/null over /dev/fuse",
        )


def _pinning_mounts() -> list[bytes]:
    """The mount points, in this namespace, of FUSE filesystems and of filesystems on loop
    devices: copies of what imgprep (and others) mounted in the host, which this namespace
    would otherwise keep mounted after the host unmounts them."""
    found = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(b" - ")
            fields, tail = before.split(), after.split()
            if len(fields) < 5 or len(tail) < 2:
                continue
            fstype, source = tail[0], tail[1]
            if fstype.startswith(b"fuse") or source.startswith(b"/dev/loop"):
                found.append(unescape_mount_point(fields[4]))
    return found


def _serve_mount(
    channel: socket.socket, pid: int, mount_point: Path, user: User, deadline: float
) -> bool:
    """Answer the daemon's one mount request; whether a mount was made (False: the daemon
    exited, or gave up, before asking)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommandError(f"the FUSE daemon did not ask to mount {mount_point} in time")
        ready, _, _ = select.select([channel], [], [], min(left, 0.5))
        if not ready:
            if _exited(pid):
                return False
            continue
        raw = channel.recv(65536)
        if not raw:
            return False
        try:
            requested = _requested(json.loads(raw), mount_point)
        except (ValueError, TypeError) as error:
            channel.sendall(f"refused: {error}".encode())
            return False
        fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            _mount(fuse, mount_point, user, requested)
            socket.send_fds(channel, [b"mounted"], [fuse])
        except OSError as error:
            _detach(mount_point)
            with contextlib.suppress(OSError):
                channel.sendall(f"mount failed: {error}".encode())
            raise DeviceError(f"mounting the FUSE connection on {mount_point}: {error}") from None
        finally:
            os.close(fuse)
        return True


def _requested(args: object, mount_point: Path) -> tuple[bool, bool, int | None]:
    """From fusermount's arguments (`-o OPTIONS -- MOUNTPOINT`): read-only, default
    permissions, max_read. The mount point must be `mount_point`."""
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or not args:
        raise ValueError("malformed arguments")
    if os.path.realpath(args[-1]) != os.path.realpath(mount_point):
        raise ValueError(f"the mount point {args[-1]!r} is not {mount_point}")
    options: list[str] = []
    for flag, value in itertools.pairwise(args):
        if flag == "-o":
            options.extend(value.split(","))
    max_read = None
    for option in options:
        if option.startswith("max_read="):
            max_read = int(option.removeprefix("max_read="))
            if not 0 < max_read <= 2**30:
                raise ValueError(f"max_read {max_read} is out of range")
    return "ro" in options, "default_permissions" in options, max_read


def _mount(
    fuse: int, mount_point: Path, user: User, requested: tuple[bool, bool, int | None]
) -> None:
    read_only, default_permissions, max_read = requested
    kind = stat.S_IFMT(os.lstat(mount_point).st_mode)
    if kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise OSError(f"{mount_point} is neither a file nor a directory")
    options = [f"fd={fuse}", f"rootmode={kind:o}", f"user_id={user.uid}", f"group_id={user.gid}"]
    options.append("allow_other")  # root (the helper) reads the export and writes the guest
    if default_permissions:
        options.append("default_permissions")
    if max_read is not None:
        options.append(f"max_read={max_read}")
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | (MS_RDONLY if read_only else 0)
    _call(
        _libc.mount(
            b"imgprep", os.fsencode(mount_point), b"fuse", flags, ",".join(options).encode()
        ),
        f"mount of {mount_point}",
    )


def _wait(pid: int, deadline: float) -> int:
    """The daemon's first process's wait status (it exits once the daemon is in the
    background); CommandError past the deadline."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            raise CommandError("the FUSE daemon did not finish starting in time")
        time.sleep(0.01)


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as proc:
            return proc.read().split(b") ", 1)[1][:1] == b"Z"
    except (OSError, IndexError):
        return True


def _detach(mount_point: Path) -> None:
    with contextlib.suppress(OSError):
        _call(_libc.umount2(os.fsencode(mount_point), MNT_DETACH), f"umount {mount_point}")


def _read_all(fd: int, deadline: float) -> str:
    """What the daemon wrote to its standard error until it closed it (a daemon in the
    background points it at /dev/null), or until `deadline`."""
    chunks = []
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _open_descriptors() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/fd") if name.isdigit()]


def _call(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
