"""Linux capabilities: drop a process to a given set, and read a process's sets from /proc.

An operation's child process keeps only the capabilities its operation needs: every other one
is dropped from the bounding set (so nothing it executes, root or not, can regain it) and from
its permitted, effective and inheritable sets; ambient capabilities are cleared. Python has no
binding for capset(2), so this is ctypes on libc (no extra package: python-prctl is unmaintained
since 2020 and needs a compiler and libcap headers).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_SYS_ADMIN = 21

NAMES = {
    CAP_CHOWN: "CAP_CHOWN",
    CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE",
    CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH",
    CAP_FOWNER: "CAP_FOWNER",
    CAP_KILL: "CAP_KILL",
    CAP_SETGID: "CAP_SETGID",
    CAP_SETUID: "CAP_SETUID",
    CAP_SETPCAP: "CAP_SETPCAP",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
}

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_PDEATHSIG = 1
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def last_cap() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def limit_to(keep: Iterable[int]) -> None:
    """Keep only `keep` in this process's bounding, permitted and effective sets."""
    kept = set(keep)
    for cap in range(last_cap() + 1):
        if cap not in kept:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient")
    mask = 0
    for cap in kept:
        mask |= 1 << cap
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for index in range(2):
        word = (mask >> (32 * index)) & 0xFFFFFFFF
        data[index].effective = word
        data[index].permitted = word
        data[index].inheritable = 0
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def die_with_parent(signal_number: int) -> None:
    """Receive `signal_number` when the process that started this one ends."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0), "PR_SET_PDEATHSIG")


def sets(pid: int | str = "self") -> dict[str, int]:
    """A process's Cap* sets (CapInh, CapPrm, CapEff, CapBnd, CapAmb) from /proc as integers."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            found[key] = int(value.strip(), 16)
    return found


def uids(pid: int | str = "self") -> tuple[int, int, int, int]:
    """A process's real, effective, saved and filesystem uids from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            real, effective, saved, filesystem = (int(v) for v in line.split()[1:5])
            return real, effective, saved, filesystem
    raise LookupError(f"no Uid line in /proc/{pid}/status")


def missing(needed: Iterable[int], pid: int | str = "self") -> list[str]:
    """The names of the capabilities of `needed` that the process does not hold (effective)."""
    held = sets(pid)["CapEff"]
    return describe(sum(1 << cap for cap in set(needed) if not held >> cap & 1))


def describe(mask: int) -> list[str]:
    """The names of the capabilities in `mask` (numbers for those without a name here)."""
    return [NAMES.get(cap, str(cap)) for cap in range(64) if mask >> cap & 1]
