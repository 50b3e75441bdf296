"""The machine's state after a test or a fault campaign: what a leak would leave behind.

Every integration test ends by checking these: no lock key in Redis, no temporary file in the
cache, no loop device, mount, FUSE export or storage daemon of ours. The fault campaign counts
the same things as left behind, then removes whatever is left (`release_everything_under`), so
a run never leaves anything on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import redis

from domain.cache.references import parse_disk_holder
from worker.stores.redis_references import REFS_PREFIX

# Temporaries of any writer, whatever its fence: `<name>.part`, `<name>.part.<fence>`,
# `<name>.json.part.<fence>`, `<name>.converted.<fence>`, `disk.info.part.<fence>`.
TEMPORARY_NAME = re.compile(r"\.(part|converted)(\.|$)")


def lock_keys(client: redis.Redis) -> list[str]:
    return sorted(key.decode() for key in client.scan_iter(match="imgprep:lock:*"))


def keys_without_expiry(client: redis.Redis) -> list[str]:
    """imgprep keys that would stay forever; only the fencing counter and the references to
    cached bases (which live as long as their disks) are meant to."""
    return sorted(
        key.decode()
        for key in client.scan_iter(match="imgprep:*")
        if key not in (b"imgprep:fence", b"imgprep:rbd:last-used", b"imgprep:rbd:images")
        and not key.startswith(REFS_PREFIX.encode())
        and client.ttl(key) == -1
    )


def dangling_references(client: redis.Redis, instances_dir: Path) -> list[str]:
    """References no finished canvas should leave: pins of canvases (they end with the canvas)
    and references of this machine's disks that do not exist."""
    host = socket.gethostname()
    found = []
    for key in client.scan_iter(match=REFS_PREFIX + "*"):
        for raw in client.hkeys(key):
            holder = raw.decode() if isinstance(raw, bytes) else str(raw)
            parsed = parse_disk_holder(holder)
            if parsed is None or (
                parsed[0] == host and not (instances_dir / parsed[1] / parsed[2]).exists()
            ):
                found.append(f"{key.decode()} {holder}")
    return sorted(found)


def temp_files(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return sorted(p for p in directory.rglob("*") if TEMPORARY_NAME.search(p.name))


def loop_devices_backed_by(root: Path) -> list[str]:
    """Loop devices whose backing file lies under `root`."""
    listing = subprocess.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    )
    if listing.returncode != 0 or not listing.stdout.strip():
        return []
    devices = json.loads(listing.stdout).get("loopdevices", [])
    prefix = str(root.resolve())
    return [d["name"] for d in devices if (d.get("back-file") or "").startswith(prefix)]


def mounts_under(root: Path) -> list[str]:
    """Mount points strictly below `root` (a root that is itself a mount is the test's own)."""
    prefix = str(root.resolve()) + "/"
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount_point = fields[1].encode().decode("unicode_escape")
        if mount_point.startswith(prefix):
            found.append(mount_point)
    return found


DAEMONS = ("qemu-storage-daemon", "fuse2fs")


def processes_mentioning(root: Path, names: tuple[str, ...] = DAEMONS) -> list[int]:
    """Pids of helper daemons whose command line names a path under `root`."""
    pids = []
    prefix = str(root.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if (
            words
            and any(Path(words[0]).name == n for n in names)
            and any(prefix in w for w in words)
        ):
            pids.append(int(proc.name))
    return pids


def leftovers(
    *,
    client: redis.Redis,
    cache_dir: Path,
    instances_dir: Path,
    state_dir: Path,
    devices_dir: Path | None = None,
) -> dict[str, list[object]]:
    """Everything a leak could leave behind, by kind; empty lists when the machine is clean.
    `devices_dir`: the device work areas, when they are not under `state_dir` (the helper's)."""
    roots = (cache_dir, instances_dir, state_dir, *([devices_dir] if devices_dir else []))
    return {
        "lock keys": list(lock_keys(client)),
        "keys without expiry": list(keys_without_expiry(client)),
        "dangling references": list(dangling_references(client, instances_dir)),
        "temporary files": [str(p) for root in roots for p in temp_files(root)],
        "loop devices": [d for root in roots for d in loop_devices_backed_by(root)],
        "mounts": [m for root in roots for m in mounts_under(root)],
        "daemons": [p for root in roots for p in processes_mentioning(root)],
    }


def assert_clean(**where: object) -> None:
    found = {kind: items for kind, items in leftovers(**where).items() if items}  # type: ignore[arg-type]
    assert not found, f"left behind: {found}"


def release_everything_under(root: Path) -> list[str]:
    """Unmount, detach and end what is left under `root` (deepest mounts first); what was done."""
    done = []
    for point in sorted(mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        done.append(f"unmounted {point}")
    for pid in processes_mentioning(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        done.append(f"killed daemon {pid}")
    for device in loop_devices_backed_by(root):
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        done.append(f"detached {device}")
    return done
