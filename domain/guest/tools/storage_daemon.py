"""qemu-storage-daemon(1): a qcow2 overlay, or an RBD image, exported as a raw file over FUSE.

Every node is spelled out, so the daemon opens exactly the overlay and the cached base that
imgprep created, never a backing file named inside an image header: the base is opened
read-only, so every write through the export lands in the overlay. One name in a qcow2 header
cannot be pinned away: an external data file (qemu refuses `data-file` for an image without
one). So with the privileged helper, `start_as_user` runs the daemon as the workers' user
(domain.guest.tools.fuse_as_user), which opens the overlay and anything it names with exactly the
worker's rights, after refusing a header that names a data file (domain.formats.qcow2_header).
The daemon detaches once the export is live; on SIGTERM it unmounts the export (as root; as the
workers' user it cannot, and teardown unmounts it) and exits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from domain.core.errors import PrivilegeRefused
from domain.core.runner import Runner
from domain.formats import qcow2_header
from domain.guest.tools import daemons, fuse_as_user

STORAGE_DAEMON = "qemu-storage-daemon"


def export_arguments(
    overlay: Path,
    *,
    backing: Path | None,
    backing_format: str | None,
    export: Path,
    allow_other: bool = False,
) -> list[str]:
    """The command line that exports `overlay` (qcow2) writable at the file `export`; with
    `allow_other`, users other than the daemon's may open it (as its owner and mode allow)."""
    nodes: list[dict[str, object]] = []
    backing_node: str | None = None
    if backing is not None:
        nodes.append(
            {
                "driver": "file",
                "filename": str(backing),
                "node-name": "base-file",
                "read-only": True,
            }
        )
        base: dict[str, object] = {
            "driver": backing_format or "raw",
            "file": "base-file",
            "node-name": "base",
            "read-only": True,
        }
        if backing_format == "qcow2":
            base["backing"] = None
        nodes.append(base)
        backing_node = "base"
    nodes.append({"driver": "file", "filename": str(overlay), "node-name": "disk-file"})
    nodes.append(
        {"driver": "qcow2", "file": "disk-file", "backing": backing_node, "node-name": "disk"}
    )
    return _exporting(nodes, export=export, allow_other=allow_other)


def _exporting(nodes: Sequence[dict[str, object]], *, export: Path, allow_other: bool) -> list[str]:
    """The daemon's command line with `nodes` as its block devices, the one named "disk"
    exported writable over FUSE at the file `export`."""
    exported = {
        "type": "fuse",
        "id": "export",
        "node-name": "disk",
        "mountpoint": str(export),
        "writable": True,
        "allow-other": "on" if allow_other else "off",
    }
    argv = [STORAGE_DAEMON]
    for node in nodes:
        argv += ["--blockdev", json.dumps(node)]
    return [*argv, "--export", json.dumps(exported)]


def start(
    runner: Runner,
    overlay: Path,
    *,
    backing: Path | None,
    backing_format: str | None,
    export: Path,
    pidfile: Path,
    allow_other: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> None:
    """Start the daemon; it returns once the export is mounted and the pid file written.
    `overlay` and `backing` may be `/proc/self/fd/N` of descriptors in `pass_fds`: the daemon
    opens its block nodes after --daemonize forks, and the forked daemon inherits them."""
    argv = export_arguments(
        overlay,
        backing=backing,
        backing_format=backing_format,
        export=export,
        allow_other=allow_other,
    )
    runner.run([*argv, "--daemonize", "--pidfile", str(pidfile)], timeout=120, pass_fds=pass_fds)


def start_as_user(
    overlay: Path,
    *,
    backing: Path | None,
    backing_format: str | None,
    export: Path,
    pidfile: Path,
    user: fuse_as_user.User,
    handoff: Path,
    owners: frozenset[int],
    timeout: float = 120,
) -> None:
    """Start the daemon as `user` (the workers'), with root (this process) mounting its export:
    the overlay, and the base, are opened as that user without following links, and a qcow2
    header that names an external data file or an unknown incompatible feature is refused
    (PrivilegeRefused) before the daemon starts. Then this process writes the pid file."""
    files = [
        fuse_as_user.HeldFile(overlay, write=True, inspect=_refusing_references(overlay)),
    ]
    if backing is not None:
        inspect = _refusing_references(backing) if backing_format == "qcow2" else None
        files.append(fuse_as_user.HeldFile(backing, write=False, inspect=inspect))

    def argv(paths: Sequence[Path]) -> list[str]:
        return [
            *export_arguments(
                paths[0],
                backing=paths[1] if backing is not None else None,
                backing_format=backing_format,
                export=export,
                allow_other=True,
            ),
            "--daemonize",
        ]

    _start_as_user(
        argv,
        files=files,
        export=export,
        pidfile=pidfile,
        user=user,
        handoff=handoff,
        owners=owners,
        timeout=timeout,
    )


def _start_as_user(
    argv: Callable[[Sequence[Path]], list[str]],
    *,
    files: Sequence[fuse_as_user.HeldFile],
    export: Path,
    pidfile: Path,
    user: fuse_as_user.User,
    handoff: Path,
    owners: frozenset[int],
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> None:
    """Start the daemon `argv` makes as `user`, with root (this process) mounting its export;
    then write the pid file of the daemons serving `export`."""
    fuse_as_user.start(
        argv,
        files=files,
        mount_point=export,
        user=user,
        handoff=handoff,
        owners=owners,
        timeout=timeout,
        env=env,
    )
    pids = daemons.find(STORAGE_DAEMON, export)
    pidfile.write_text("".join(f"{pid}\n" for pid in pids))


def _refusing_references(path: Path) -> fuse_as_user.Inspect:
    def inspect(fd: int) -> None:
        head = qcow2_header.read_head(fd)
        if not qcow2_header.is_qcow2(head):
            raise PrivilegeRefused(f"{path} is not a qcow2 image: refused")
        qcow2_header.refuse_references(head, str(path), backing_pinned=True)

    return inspect


@dataclass(frozen=True)
class RbdNode:
    """An RBD image as qemu's rbd driver opens it: the pool and image, the clients' ceph.conf
    and cephx user; the keyring reaches librados in CEPH_ARGS (the driver has no option for
    it). Every value is one safe word (checked where it comes from: settings, the helper's
    protocol), so CEPH_ARGS, split on spaces, carries it whole."""

    pool: str
    image: str
    conf: Path
    user: str
    keyring: Path | None

    def environment(self) -> dict[str, str]:
        args = f"--keyring {self.keyring}" if self.keyring is not None else ""
        return {"CEPH_ARGS": args} if args else {}


def rbd_export_arguments(node: RbdNode, *, export: Path, allow_other: bool = False) -> list[str]:
    """The command line that exports the RBD image writable at the file `export` (no header is
    parsed: an rbd image is raw; librbd opens a clone's parent by the id in the cluster's own
    metadata, never a name the guest wrote)."""
    rbd: dict[str, object] = {
        "driver": "rbd",
        "pool": node.pool,
        "image": node.image,
        "conf": str(node.conf),
        "node-name": "disk-file",
        "cache": {"direct": True},
    }
    if node.user:
        rbd["user"] = node.user
    raw: dict[str, object] = {"driver": "raw", "file": "disk-file", "node-name": "disk"}
    return _exporting([rbd, raw], export=export, allow_other=allow_other)


def start_rbd(
    runner: Runner, node: RbdNode, *, export: Path, pidfile: Path, allow_other: bool = False
) -> None:
    """Start the daemon exporting an RBD image, in this process's rights (no helper)."""
    ceph = dataclasses.replace(runner, env={**runner.env, **node.environment()})
    argv = rbd_export_arguments(node, export=export, allow_other=allow_other)
    ceph.run([*argv, "--daemonize", "--pidfile", str(pidfile)], timeout=120)


def start_rbd_as_user(
    node: RbdNode,
    *,
    export: Path,
    pidfile: Path,
    user: fuse_as_user.User,
    handoff: Path,
    owners: frozenset[int],
    timeout: float = 120,
) -> None:
    """Start the daemon exporting an RBD image as `user` (the workers', who can read the Ceph
    key), with root (this process) mounting its export; then write the pid file."""

    def argv(paths: Sequence[Path]) -> list[str]:
        return [*rbd_export_arguments(node, export=export, allow_other=True), "--daemonize"]

    _start_as_user(
        argv,
        files=[],
        export=export,
        pidfile=pidfile,
        user=user,
        handoff=handoff,
        owners=owners,
        timeout=timeout,
        env=node.environment(),
    )
