"""The helper's wire protocol: one JSON request per connection, one JSON reply.

A request is one of the models below, told apart by `op`; anything else (an unknown `op`, an
extra field, a value of the wrong type) is refused before any code of an operation runs. The
reply is `Reply`: `result` on success, or `error` with the imgprep error class and a message.
The models are strict: JSON types only, no coercion.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from domain.core.models import FileInjection, InjectedFile

MAX_REQUEST_BYTES = 4 * 2**20  # 256 KiB of files, base64, with room to spare
Daemon = Literal["fuse2fs", "qemu-storage-daemon"]
AbsolutePath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^/")]


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class AttachLoop(_Request):
    op: Literal["attach_loop"] = "attach_loop"
    backing: AbsolutePath
    offset: int = Field(ge=0)
    size: int = Field(gt=0)


class DetachLoop(_Request):
    op: Literal["detach_loop"] = "detach_loop"
    device: Annotated[str, Field(pattern=r"^/dev/loop[0-9]{1,6}$")]


class MountFuse2fs(_Request):
    op: Literal["mount_fuse2fs"] = "mount_fuse2fs"
    image: AbsolutePath
    target: AbsolutePath
    offset: int = Field(ge=0)


class MountKernel(_Request):
    op: Literal["mount_kernel"] = "mount_kernel"
    device: Annotated[str, Field(pattern=r"^/dev/loop[0-9]{1,6}$")]
    target: AbsolutePath
    fstype: Annotated[str, Field(pattern=r"^[a-z0-9]{1,16}$")]


class Unmount(_Request):
    op: Literal["unmount"] = "unmount"
    target: AbsolutePath


class IsLiveMount(_Request):
    op: Literal["is_live_mount"] = "is_live_mount"
    target: AbsolutePath


class StartStorageDaemon(_Request):
    op: Literal["start_storage_daemon"] = "start_storage_daemon"
    overlay: AbsolutePath
    backing: AbsolutePath | None
    backing_format: Literal["raw", "qcow2"] | None
    export: AbsolutePath
    pidfile: AbsolutePath


# One word of a Ceph name or path: what CEPH_ARGS (split on spaces) and qemu carry whole.
CephWord = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._-]+$")]
CephPath = Annotated[str, Field(min_length=2, max_length=4096, pattern=r"^/[A-Za-z0-9/._+-]*$")]


class StartRbdExport(_Request):
    """An RBD image exported by qemu-storage-daemon, run as the workers' user (who holds the
    Ceph key); root only mounts its FUSE export."""

    op: Literal["start_rbd_export"] = "start_rbd_export"
    pool: CephWord
    image: CephWord
    conf: CephPath
    user: Annotated[str, Field(max_length=255, pattern=r"^[A-Za-z0-9._-]*$")]
    keyring: CephPath | None
    export: AbsolutePath
    pidfile: AbsolutePath


class StopDaemons(_Request):
    op: Literal["stop_daemons"] = "stop_daemons"
    program: Daemon
    path: AbsolutePath
    timeout: float = Field(gt=0, le=600)


class KillDaemons(_Request):
    op: Literal["kill_daemons"] = "kill_daemons"
    program: Daemon
    path: AbsolutePath


class MakeWorkArea(_Request):
    """Create a disk's work area `<devices_dir>/<instance>/<disk>` (root's, 0755)."""

    op: Literal["make_work_area"] = "make_work_area"
    path: AbsolutePath


class RemoveWorkArea(_Request):
    """Remove a disk's work area and what imgprep puts in it, once nothing is mounted there."""

    op: Literal["remove_work_area"] = "remove_work_area"
    path: AbsolutePath


class WriteFiles(_Request):
    op: Literal["write_files"] = "write_files"
    root: AbsolutePath
    disk: Annotated[str, Field(max_length=300)]
    files: Annotated[tuple[FileInjection, ...], Field(max_length=64)]
    use_openat2: bool | None = None


class Ping(_Request):
    """Whether the helper answers, and which roots it serves."""

    op: Literal["ping"] = "ping"


Request = Annotated[
    AttachLoop
    | DetachLoop
    | MountFuse2fs
    | MountKernel
    | Unmount
    | IsLiveMount
    | StartStorageDaemon
    | StartRbdExport
    | StopDaemons
    | KillDaemons
    | MakeWorkArea
    | RemoveWorkArea
    | WriteFiles
    | Ping,
    Field(discriminator="op"),
]
REQUEST: TypeAdapter[Request] = TypeAdapter(Request)
OPERATIONS = tuple(
    model.model_fields["op"].default
    for model in (
        AttachLoop,
        DetachLoop,
        MountFuse2fs,
        MountKernel,
        Unmount,
        IsLiveMount,
        StartStorageDaemon,
        StartRbdExport,
        StopDaemons,
        KillDaemons,
        MakeWorkArea,
        RemoveWorkArea,
        WriteFiles,
        Ping,
    )
)


class ErrorReply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    error_class: str  # a class of domain.core.errors, or "CommandError"
    message: str


class Reply(BaseModel):
    """`result`: the operation's answer (a device path, a bool, pids, injected files, None)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ok: bool
    result: str | bool | list[int] | list[InjectedFile] | dict[str, str] | None = None
    error: ErrorReply | None = None
    # what the operation's process held, read from /proc after dropping: effective, bounding
    capabilities: dict[str, list[str]] | None = None
