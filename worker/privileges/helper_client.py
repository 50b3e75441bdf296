"""The privileged helper's client: PrivilegedOperations over its Unix socket.

Each call is one connection, one request (helper.protocol), one reply. A helper that does not
answer is `HelperUnavailable` (transient: the step retries with backoff, and says what to
check); an error the helper reports comes back as the same imgprep error class (a refusal is
the permanent `PrivilegeRefused`), and a failed command as `CommandError`, as if the operation
had run in this process.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import structlog
from pydantic import ValidationError

from domain.core import errors
from domain.core.models import FileInjection, InjectedFile
from domain.core.runner import CommandError
from helper.protocol import (
    AttachLoop,
    Daemon,
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

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 400.0  # above the helper's own limit of one operation


class HelperClient:
    """PrivilegedOperations carried out by the helper listening at `socket_path`."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def call(self, request: Request) -> Reply:
        data = request.model_dump_json().encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(CONNECT_TIMEOUT)
                connection.connect(str(self.socket_path))
                connection.settimeout(REPLY_TIMEOUT)
                try:
                    connection.sendall(data)
                    connection.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # answered before it read the request (it is busy): read the answer
                raw = _read_all(connection)
            reply = Reply.model_validate_json(raw)
        except (OSError, ValidationError) as error:
            raise errors.HelperUnavailable(
                f"the privileged helper at {self.socket_path} did not answer {request.op} "
                f"({_describe(error)}); is `imgprep helper` (or the worker that starts it) "
                "running as root?"
            ) from None
        if reply.ok:
            return reply
        raise _rebuilt(reply)

    def ping(self) -> dict[str, str]:
        """The helper answers with the directories it serves (its roots, real paths)."""
        result = self.call(Ping()).result
        return (
            {str(key): str(value) for key, value in result.items()}
            if isinstance(result, dict)
            else {}
        )

    def attach_loop(self, backing: Path, *, offset: int, size: int) -> str:
        result = self.call(AttachLoop(backing=str(backing), offset=offset, size=size)).result
        return str(result)

    def detach_loop(self, device: str) -> None:
        self.call(DetachLoop(device=device))

    def mount_fuse2fs(self, image: Path, target: Path, *, offset: int) -> None:
        self.call(MountFuse2fs(image=str(image), target=str(target), offset=offset))

    def mount_kernel(self, device: str, target: Path, *, fstype: str) -> None:
        self.call(MountKernel(device=device, target=str(target), fstype=fstype))

    def unmount(self, target: Path) -> None:
        self.call(Unmount(target=str(target)))

    def is_live_mount(self, target: Path) -> bool:
        return self.call(IsLiveMount(target=str(target))).result is True

    def start_storage_daemon(
        self,
        overlay: Path,
        *,
        backing: Path | None,
        backing_format: str | None,
        export: Path,
        pidfile: Path,
    ) -> None:
        self.call(
            StartStorageDaemon(
                overlay=str(overlay),
                backing=str(backing) if backing else None,
                backing_format=_backing_format(backing_format),
                export=str(export),
                pidfile=str(pidfile),
            )
        )

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
        self.call(
            StartRbdExport(
                pool=pool,
                image=image,
                conf=str(conf),
                user=user,
                keyring=str(keyring) if keyring else None,
                export=str(export),
                pidfile=str(pidfile),
            )
        )

    def stop_daemons(self, program: str, path: Path, *, timeout: float) -> list[int]:
        reply = self.call(StopDaemons(program=_daemon(program), path=str(path), timeout=timeout))
        return _pids(reply)

    def kill_daemons(self, program: str, path: Path) -> list[int]:
        return _pids(self.call(KillDaemons(program=_daemon(program), path=str(path))))

    def make_work_area(self, area: Path) -> None:
        self.call(MakeWorkArea(path=str(area)))

    def remove_work_area(self, area: Path) -> bool:
        return self.call(RemoveWorkArea(path=str(area))).result is not False

    def write_files(
        self,
        root: Path,
        files: Sequence[FileInjection],
        *,
        disk: str,
        use_openat2: bool | None = None,
    ) -> list[InjectedFile]:
        reply = self.call(
            WriteFiles(root=str(root), disk=disk, files=tuple(files), use_openat2=use_openat2)
        )
        if not isinstance(reply.result, list):
            return []
        return [item for item in reply.result if isinstance(item, InjectedFile)]


def _daemon(program: str) -> Daemon:
    if program == "fuse2fs":
        return "fuse2fs"
    if program == "qemu-storage-daemon":
        return "qemu-storage-daemon"
    raise errors.InvalidRequest(f"{program} is not a daemon of imgprep")


def _backing_format(name: str | None) -> Literal["raw", "qcow2"] | None:
    if name is None:
        return None
    if name == "raw":
        return "raw"
    if name == "qcow2":
        return "qcow2"
    raise errors.InvalidRequest(f"backing format {name} cannot be exported")


def _pids(reply: Reply) -> list[int]:
    if not isinstance(reply.result, list):
        return []
    return [item for item in reply.result if isinstance(item, int)]


def _read_all(connection: socket.socket) -> bytes:
    """The whole answer. A helper that answered before reading the request (busy) closed with
    the request unread, which the kernel reports as a reset once the answer has been read."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:
            if not chunks:
                raise
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(error: Exception) -> str:
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return "a reply that is not the helper's"


def _rebuilt(reply: Reply) -> Exception:
    """The error the helper reported, as its own class."""
    assert reply.error is not None
    name, message = reply.error.error_class, reply.error.message
    if name == "CommandError":
        return CommandError(message)
    found = getattr(errors, name, None)
    if isinstance(found, type) and issubclass(found, errors.ImgprepError):
        return found(message)
    return errors.DeviceError(f"{name}: {message}")
