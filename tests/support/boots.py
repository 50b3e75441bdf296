"""Booting prepared disks in tests: the request that injects what the test guest reports, the
boot itself, and the check that the guest saw every injected file.

Any backend's boot test uses these: prepare a disk with `request_for`, boot it with `boot` (a
file disk) or `worker.cli.demo.guest_boot.boot_guest` with a `BootDisk` (an `rbd:` name), then
`assert_reports_injected`.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from domain.core.models import DiskSpec, FileInjection, ImageSource, PreparedDisk, PrepareRequest
from worker.cli.demo.guest_boot import BootDisk, GuestReport, boot_guest
from worker.cli.demo.guest_recipe import AUTHORIZED_KEYS_PATH, MESSAGE_PATH

DISK_SIZE = 2 * 2**30  # larger than the 1 GiB guest image: the guest sees the flavor's size


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def public_key(comment: str) -> str:
    """An authorized_keys line (the guest only reports it; nothing parses the key)."""
    blob = hashlib.sha256(comment.encode()).hexdigest()[:43]
    return f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{blob} {comment}\n"


def request_for(
    source: ImageSource, backend: str, message: str, *, size: int = DISK_SIZE
) -> PrepareRequest:
    """A new instance disk of `backend` from `source`, with the message the guest prints and an
    authorized_keys (0600) injected."""
    instance = f"boot-{uuid.uuid4().hex[:10]}"
    return PrepareRequest(
        image=source,
        disk=DiskSpec(instance_id=instance, size_bytes=size, backend=backend),  # type: ignore[arg-type]
        inject=(
            FileInjection(path=MESSAGE_PATH, content=message),
            FileInjection(path=AUTHORIZED_KEYS_PATH, content=public_key(instance), mode=0o600),
        ),
    )


def boot(prepared: PreparedDisk, consoles: Path) -> GuestReport:
    """Boot a prepared file disk as it is; its console goes to `consoles/<instance>.log`."""
    disk = BootDisk.file(prepared.disk.path, prepared.disk.format)
    return boot_guest(disk, consoles / f"{prepared.disk.instance_id}.log")


def assert_reports_injected(report: GuestReport, request: PrepareRequest) -> None:
    """The guest saw every injected file with its content, mode and owner, and shut down clean."""
    for item in request.inject:
        seen = report.files.get(item.path)
        assert seen is not None, f"the guest did not find {item.path}: {report.lines}"
        assert seen.content == item.data()
        assert (seen.mode, seen.uid, seen.gid) == (item.mode, 0, 0)
    assert report.clean, report.lines
