"""qemu-storage-daemon(1): a qcow2 overlay exported as a raw file over FUSE.

Every node is spelled out, so the daemon opens exactly the overlay and the cached base that
imgprep created, never a file named inside an image header: the base is opened read-only, so
every write through the export lands in the overlay. The daemon detaches once the export is
live and writes its pid file; on SIGTERM it unmounts the export and exits.
"""

from __future__ import annotations

import json
from pathlib import Path

from domain.core.runner import Runner

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
