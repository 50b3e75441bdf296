"""inject_files: write files into the mounted guest without ever leaving the guest root.

The disk's claim is checked and its mount found live here; the writing itself (openat2 with
RESOLVE_IN_ROOT, files owned by root, renamed into place) is domain.guest.guest_writes, run by
the device context's privileged operations: in this process, or in the privileged helper.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import structlog

from domain.core.errors import DeviceError, InvalidRequest
from domain.core.models import FileInjection
from domain.guest.context import Claim, DeviceContext, InjectedDisk, MountedDisk, disk_key
from domain.guest.guest_writes import GuestRoot, have_openat2, openat2, write_file
from domain.guest.tools import mount as mounts

__all__ = ["GuestRoot", "have_openat2", "inject_files", "openat2", "write_file"]

log = structlog.get_logger(__name__)


def inject_files(
    mounted: MountedDisk,
    files: Sequence[FileInjection],
    ctx: DeviceContext,
    *,
    use_openat2: bool | None = None,
) -> InjectedDisk:
    """Write `files` into the mounted guest filesystem."""
    key = disk_key(mounted.mapped.prepared.disk)
    target = ctx.work_area(key).mount_dir
    if Path(mounted.mount_dir) != target:
        raise InvalidRequest(f"mount directory {mounted.mount_dir} is not {target}")
    with ctx.locks(ctx.lock_name(key)):
        Claim.resume(ctx, key)
        if not mounts.is_mounted(target):
            raise DeviceError(f"the guest filesystem of {key} is no longer mounted at {target}")
        written = ctx.ops.write_files(target, files, disk=key, use_openat2=use_openat2)
    log.info("files_injected", disk=key, files=[f.path for f in written])
    return InjectedDisk(mounted=mounted, files=tuple(written))
