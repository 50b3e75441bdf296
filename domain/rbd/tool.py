"""The `rbd` and `ceph` command-line tools: one function per operation, JSON output parsed here.

Why the CLI and not librbd in the worker: every call is a process the runner can time out and
kill (a librados call blocked on a missing OSD cannot be interrupted by a step's soft time
limit, and Debian's python3-rbd bindings do not import into the project's virtualenv), no
librados threads live in the prefork pool's processes, and each call is logged like every other
tool. It costs a process and a monitor session per call, about 50 ms here
(BENCHMARKS.md, figure 10).

Credentials reach the tools in `CEPH_ARGS` (`--conf`, `--id`, `--keyring`,
`--client-mount-timeout`), which the rbd CLI and librados in qemu both read; nothing of them
goes on a command line or into Redis. The tools exit with the errno of the failure, which is
mapped to the project's errors: an unreachable cluster is transient (CephUnavailable), a
missing conf, keyring, refused key or missing pool is permanent (CephConfigInvalid).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from domain.core.errors import (
    CephConfigInvalid,
    CephUnavailable,
    CommandFailed,
    CommandTimedOut,
    ImgprepError,
    RbdImageBusy,
)
from domain.core.runner import CommandError, Runner

log = structlog.get_logger(__name__)

RBD = "rbd"
CEPH = "ceph"
# What a Ceph option value may hold on CEPH_ARGS (split on spaces) and in a qemu rbd: filename
# (':' and '@' separate its fields).
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9/._+-]+$")


class RbdNotFound(ImgprepError):
    """The image or snapshot is not there (ENOENT); callers decide what that means."""


class RbdExists(ImgprepError):
    """The name is taken (EEXIST): an rbd rename or create never replaces anything."""


@dataclass(frozen=True)
class CephAccess:
    """How this host reaches its cluster (settings rbd.*): the clients' ceph.conf, the cephx user
    and keyring ("": Ceph's defaults), the pools, and how long calls may take."""

    conf: Path
    user: str
    keyring: Path | None
    pool: str  # instance disks (Nova's images_rbd_pool)
    images_pool: str  # imported images, one per image per cluster
    connect_timeout_seconds: float = 30.0
    command_timeout_seconds: float = 120.0  # metadata operations
    transfer_timeout_seconds: float = 1800.0  # imports, flattens, extracts

    def ceph_args(self) -> str:
        args = [f"--conf {self.conf}"]
        if self.user:
            args.append(f"--id {self.user}")
        if self.keyring is not None:
            args.append(f"--keyring {self.keyring}")
        args.append(f"--client-mount-timeout {int(self.connect_timeout_seconds)}")
        return " ".join(args)

    def check(self) -> None:
        """CephConfigInvalid unless the conf (and keyring, when named) can be read by this
        process and every value is one CEPH_ARGS and qemu's filename syntax carry safely."""
        for value in (
            str(self.conf),
            self.user,
            str(self.keyring or ""),
            self.pool,
            self.images_pool,
        ):
            if value and not _SAFE_VALUE.fullmatch(value):
                raise CephConfigInvalid(
                    f"rbd setting {value!r} holds characters imgprep does not pass to Ceph "
                    "(allowed: letters, digits, '/', '.', '_', '+', '-')"
                )
        for what, path in (("rbd.conf", self.conf), ("rbd.keyring", self.keyring)):
            if path is None:
                continue
            try:
                with path.open("rb"):
                    pass
            except OSError as error:
                raise CephConfigInvalid(
                    f"{what} {path} cannot be read by this worker: {error.strerror}"
                ) from None

    def qemu_filename(self, pool: str, image: str, snapshot: str | None = None) -> str:
        """The image as qemu-img names it (`rbd:pool/image[@snap]:id=user:conf=path`); the
        keyring comes from CEPH_ARGS."""
        name = f"rbd:{pool}/{image}" + (f"@{snapshot}" if snapshot else "")
        if self.user:
            name += f":id={self.user}"
        return name + f":conf={self.conf}"


@dataclass(frozen=True)
class RbdTool:
    """Runs rbd and ceph for one cluster's access; every failure typed."""

    access: CephAccess
    runner: Runner

    @property
    def ceph_runner(self) -> Runner:
        """The runner with CEPH_ARGS for this access (for qemu-img and qemu-storage-daemon too)."""
        return dataclasses.replace(
            self.runner, env={**self.runner.env, "CEPH_ARGS": self.access.ceph_args()}
        )

    def run(self, *args: str, timeout: float | None = None, what: str = "") -> str:
        """`rbd ARGS`; its standard output."""
        return self._run([RBD, *args], timeout=timeout, what=what)

    def json(self, *args: str, what: str = "") -> object:
        out = self.run(*args, "--format", "json", what=what)
        try:
            return json.loads(out) if out.strip() else None
        except ValueError:
            raise CommandFailed(f"rbd {args[0]} printed no JSON: {out[:200]!r}") from None

    def fsid(self) -> str:
        """The cluster's fsid (`ceph fsid`), asked once per process and access."""
        return _fsid(self)

    def stream(
        self, argv: list[str], *, on_line: Callable[[str], None], what: str, timeout: float
    ) -> None:
        """A qemu tool on this cluster, with its progress lines (qemu-img convert -p)."""
        self.access.check()
        try:
            self.ceph_runner.stream(argv, on_line=on_line, timeout=timeout)
        except CommandError as error:
            raise failure(error, what) from None
        except CommandTimedOut as error:
            raise CephUnavailable(f"{what}: {error}") from None

    def _run(self, argv: list[str], *, timeout: float | None, what: str) -> str:
        self.access.check()
        try:
            result = self.ceph_runner.run(
                argv, timeout=timeout or self.access.command_timeout_seconds
            )
        except CommandError as error:
            raise failure(error, what or " ".join(argv[1:3])) from None
        except CommandTimedOut as error:
            raise CephUnavailable(
                f"{what or ' '.join(argv[:3])}: the cluster did not answer in time ({error})"
            ) from None
        return result.stdout


_FSIDS: dict[CephAccess, str] = {}


def _fsid(tool: RbdTool) -> str:
    known = _FSIDS.get(tool.access)
    if known is None:
        answer = tool._run([CEPH, "fsid", "--format", "json"], timeout=None, what="ceph fsid")
        try:
            known = str(json.loads(answer)["fsid"])
        except (ValueError, KeyError, TypeError):
            raise CommandFailed(f"ceph fsid printed no fsid: {answer[:200]!r}") from None
        _FSIDS[tool.access] = known
    return known


# `rbd: ...: (110) Connection timed out`; the ceph CLI: `[errno 110] RADOS timed out`
_UNREACHABLE = ("couldn't connect to the cluster", "error connecting", "RADOS timed out")
_ERRNO = re.compile(r"\((\d+)\) [A-Za-z]|\[errno (\d+)\]")


def failure(error: CommandError, what: str) -> ImgprepError:  # noqa: PLR0911 - one per class
    """A failed rbd/ceph/qemu call as the project's error."""
    result = error.result
    stderr = result.stderr if result is not None else str(error)
    code = result.returncode if result is not None and result.returncode > 0 else 0
    found = _ERRNO.findall(stderr)
    if found:
        code = int(next(number for number in found[-1] if number))
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), str(error))
    message = f"{what}: {last.strip()}"
    if "unable to open config file" in stderr or "did not load config file" in stderr:
        return CephConfigInvalid(f"{what}: the ceph.conf (rbd.conf) cannot be read: {last}")
    if "no keyring found" in stderr or "failed to fetch mon config" in stderr:
        return CephConfigInvalid(
            f"{what}: no usable keyring for the Ceph user (rbd.keyring, rbd.user): {last}"
        )
    if "error opening pool" in stderr or (code == errno.ENOENT and "pool" in last):
        return CephConfigInvalid(
            f"{what}: the pool does not exist (rbd.pool, rbd.images_pool): {last}"
        )
    unreachable = any(marker in stderr for marker in _UNREACHABLE)
    if code in (errno.ETIMEDOUT, errno.ECONNREFUSED, errno.EHOSTUNREACH) or (
        unreachable and code not in (errno.EACCES, errno.EPERM)
    ):
        return CephUnavailable(f"{what}: the Ceph cluster does not answer: {last}")
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in stderr:
        return CephConfigInvalid(f"{what}: the cluster refused the Ceph user's key or caps: {last}")
    if code == errno.ENOENT or "No such file or directory" in stderr:
        return RbdNotFound(message)
    if code == errno.EEXIST or "File exists" in stderr:
        return RbdExists(message)
    if code == errno.EBUSY or "Device or resource busy" in stderr or "has watchers" in stderr:
        return RbdImageBusy(message)
    return CommandFailed(message)


# --- the operations --------------------------------------------------------------------------


class ImageInfo(BaseModel):
    """The fields of `rbd info --format json` imgprep reads."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    id: str
    size: int = Field(ge=0)
    parent: dict[str, object] | None = None

    def parent_spec(self) -> tuple[str, str, str] | None:
        """(pool, image, snapshot) of a clone's parent."""
        if not self.parent:
            return None
        return (
            str(self.parent.get("pool")),
            str(self.parent.get("image")),
            str(self.parent.get("snapshot")),
        )


class Snapshot(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    size: int = Field(ge=0)
    protected: bool = False


def spec(pool: str, image: str, snapshot: str | None = None) -> str:
    return f"{pool}/{image}" + (f"@{snapshot}" if snapshot else "")


def info(tool: RbdTool, pool: str, image: str) -> ImageInfo | None:
    """The image, or None when it is not there."""
    try:
        found = tool.json("info", spec(pool, image), what=f"rbd info {spec(pool, image)}")
    except RbdNotFound:
        return None
    try:
        return ImageInfo.model_validate(found)
    except ValidationError as error:
        raise CommandFailed(f"rbd info {spec(pool, image)}: unexpected JSON: {error}") from None


def snapshots(tool: RbdTool, pool: str, image: str) -> list[Snapshot] | None:
    """The image's snapshots, or None when the image is not there."""
    try:
        found = tool.json("snap", "ls", spec(pool, image), what=f"rbd snap ls {spec(pool, image)}")
    except RbdNotFound:
        return None
    items = found if isinstance(found, list) else []
    return [
        Snapshot(
            name=str(item["name"]),
            size=int(item["size"]),
            protected=str(item.get("protected", "false")) == "true",
        )
        for item in items
        if isinstance(item, dict)
    ]


def list_images(tool: RbdTool, pool: str) -> list[str]:
    found = tool.json("ls", "--pool", pool, what=f"rbd ls {pool}")
    return sorted(str(name) for name in found) if isinstance(found, list) else []


def children(tool: RbdTool, pool: str, image: str, snapshot: str) -> list[str]:
    """`pool/image` of every clone of the snapshot (in any pool), trashed ones included."""
    try:
        found = tool.json("children", "--all", spec(pool, image, snapshot), what="rbd children")
    except RbdNotFound:
        return []
    items = found if isinstance(found, list) else []
    return [f"{item['pool']}/{item['image']}" for item in items if isinstance(item, dict)]


def clone(tool: RbdTool, parent: tuple[str, str, str], pool: str, image: str) -> None:
    tool.run("clone", spec(*parent), spec(pool, image), what=f"rbd clone {spec(*parent)}")


def resize(tool: RbdTool, pool: str, image: str, size: int) -> None:
    """Grow the image to `size` bytes (never shrinks: --allow-shrink is not passed); an image
    of that size already is left as it is."""
    try:
        _resize(tool, pool, image, size)
    except CommandFailed as error:
        if "new size is equal to original size" not in str(error):
            raise


def _resize(tool: RbdTool, pool: str, image: str, size: int) -> None:
    tool.run(
        "resize",
        "--no-progress",
        "--size",
        f"{size}B",
        spec(pool, image),
        what=f"rbd resize {spec(pool, image)}",
    )


def rename(tool: RbdTool, pool: str, old: str, new: str) -> None:
    """RbdExists when `new` is taken: a rename never replaces an image."""
    tool.run("rename", spec(pool, old), spec(pool, new), what=f"rbd rename {spec(pool, old)}")


def remove(tool: RbdTool, pool: str, image: str) -> bool:
    """Remove the image (it must have no snapshots); False when it was not there. Blocks until a
    dead client's watch has expired (osd_client_watch_timeout, 30 s)."""
    try:
        tool.run(
            "rm",
            "--no-progress",
            spec(pool, image),
            what=f"rbd rm {spec(pool, image)}",
            timeout=tool.access.transfer_timeout_seconds,
        )
    except RbdNotFound:
        return False
    return True


def snap_create(tool: RbdTool, pool: str, image: str, snapshot: str) -> None:
    tool.run("snap", "create", "--no-progress", spec(pool, image, snapshot), what="rbd snap create")


def snap_protect(tool: RbdTool, pool: str, image: str, snapshot: str) -> None:
    tool.run("snap", "protect", spec(pool, image, snapshot), what="rbd snap protect")


def snap_unprotect(tool: RbdTool, pool: str, image: str, snapshot: str) -> None:
    tool.run("snap", "unprotect", spec(pool, image, snapshot), what="rbd snap unprotect")


def snap_remove(tool: RbdTool, pool: str, image: str, snapshot: str) -> None:
    tool.run("snap", "rm", "--no-progress", spec(pool, image, snapshot), what="rbd snap rm")


def flatten(tool: RbdTool, pool: str, image: str) -> None:
    tool.run(
        "flatten",
        "--no-progress",
        spec(pool, image),
        what=f"rbd flatten {spec(pool, image)}",
        timeout=tool.access.transfer_timeout_seconds,
    )


def metadata_set(tool: RbdTool, pool: str, image: str, key: str, value: str) -> None:
    tool.run("image-meta", "set", spec(pool, image), key, value, what="rbd image-meta set")


def metadata_get(tool: RbdTool, pool: str, image: str, key: str) -> str | None:
    try:
        return tool.run("image-meta", "get", spec(pool, image), key, what="rbd image-meta get")
    except RbdNotFound:
        return None
