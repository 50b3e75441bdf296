"""Mounts, loop devices and helper daemons under the campaign's directory: what the checker
counts as left behind, and what the campaign removes itself at the end whatever imgprep left,
so a run never leaves anything on the machine.

(tests/support/machine.py probes the same things for the tests; bench/ does not import tests/.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

DAEMONS = ("qemu-storage-daemon", "fuse2fs")


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        point = line.split()[1].encode().decode("unicode_escape")
        if point.startswith(prefix):
            found.append(point)
    return found


def loop_devices_under(root: Path) -> list[str]:
    listing = subprocess.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    )
    if listing.returncode != 0 or not listing.stdout.strip():
        return []
    prefix = str(root.resolve())
    return [
        device["name"]
        for device in json.loads(listing.stdout).get("loopdevices", [])
        if (device.get("back-file") or "").startswith(prefix)
    ]


def daemons_under(root: Path) -> list[int]:
    """Pids of qemu-storage-daemon and fuse2fs processes whose arguments name a path under root."""
    prefix = str(root.resolve())
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            words = [
                w.decode(errors="replace") for w in (proc / "cmdline").read_bytes().split(b"\0")
            ]
        except OSError:
            continue
        if words and Path(words[0]).name in DAEMONS and any(prefix in w for w in words):
            pids.append(int(proc.name))
    return pids


def release_everything_under(root: Path) -> list[str]:
    """Unmount, detach and end what is left under `root` (deepest mounts first); what was done."""
    done = []
    for point in sorted(mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        done.append(f"unmounted {point}")
    for pid in daemons_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        done.append(f"killed daemon {pid}")
    for device in loop_devices_under(root):
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        done.append(f"detached {device}")
    return done
