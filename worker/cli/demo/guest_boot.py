"""Booting a disk in a real virtual machine and reading what its guest reports.

`boot_guest(BootDisk.file(path, "qcow2"), console=...)` starts qemu-system-x86_64 on the disk
(its boot loader, kernel and init are the disk's own), waits until the machine powers itself
off, and returns the guest's report (guest_recipe.py: the lines its init prints). Any disk qemu
can open boots the same way: a file with its format, or a protocol name such as
`BootDisk("rbd:pool/image:conf=/path/ceph.conf", "raw")`.

The machine has no network (`-nic none`), never reboots (`-no-reboot`: a panic or reboot ends
it), runs under qemu's seccomp sandbox, and is stopped by its pid when it outlives its timeout.
KVM is used only where it works: hardware virtualization visible to this machine and a probe
guest that runs under it; elsewhere (a nested PVM host, where /dev/kvm exists but cannot run a
stock kernel) qemu emulates the CPU with TCG. `IMGPREP_TEST_GUEST_ACCEL=tcg|kvm` decides it
instead. Boot only disks made for the boot (a prepared instance disk, a copy): a first boot
writes to its disk.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.cli.demo.guest_recipe import MESSAGE_PATH, PREFIX

QEMU = "qemu-system-x86_64"
ACCEL_ENV = "IMGPREP_TEST_GUEST_ACCEL"
DEFAULT_TIMEOUT = 300.0  # TCG on a loaded 2-core machine: about 20 s alone, minutes if crowded
TCG = ("-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max")  # a smaller translation cache
KVM = ("-accel", "kvm", "-cpu", "host")
CONSOLE_TAIL_LINES = 40


class GuestBootFailed(RuntimeError):
    """The machine stopped, or was stopped, before its guest reported: the message says why and
    ends with the last lines of its console."""


@dataclass(frozen=True)
class BootDisk:
    """A disk qemu can open: `drive` (a path, or a protocol name such as `rbd:pool/image:…`)
    and its format."""

    drive: str
    format: str

    @classmethod
    def file(cls, path: Path | str, fmt: str) -> BootDisk:
        return cls(str(Path(path).resolve()), fmt)

    def argument(self) -> str:
        """qemu's -drive value (a comma inside a name is doubled)."""
        name = self.drive.replace(",", ",,")
        return f"file={name},format={self.format},if=none,id=boot-disk"


@dataclass(frozen=True)
class GuestFile:
    """A file as the guest saw it."""

    path: str
    mode: int
    uid: int
    gid: int
    content: bytes


@dataclass(frozen=True)
class GuestReport:
    """What the guest printed, parsed; `lines` are its own console lines as printed."""

    kernel: str
    boot_id: str
    booted_uptime: float  # seconds from the kernel's start to the guest's first line
    done_uptime: float
    disks: Mapping[str, int]  # name → bytes, as the guest sees them
    files: Mapping[str, GuestFile]
    missing: tuple[str, ...]
    earlier_boots: tuple[str, ...]
    clean: bool  # the guest left its filesystem read-only (clean) before powering off
    lines: tuple[str, ...]
    accelerator: str = ""
    seconds: float = 0.0  # from starting qemu to its exit
    console: str = field(default="", repr=False)

    def text(self, path: str) -> str:
        """The content of a file the guest reported, as text."""
        return self.files[path].content.decode()

    @property
    def message(self) -> str | None:
        found = self.files.get(MESSAGE_PATH)
        return found.content.decode(errors="replace") if found else None


def boot_guest(
    disk: BootDisk,
    console: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mib: int = 512,
    cpus: int = 1,
    accelerator: str | None = None,
) -> GuestReport:
    """Boot `disk` until its guest powers off; the guest's report, or GuestBootFailed.

    The serial console is written to `console` (kept for whoever investigates a failure)."""
    accel = accelerator or choose_accelerator()
    console.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        QEMU,
        *machine_arguments(accel, memory_mib=memory_mib, cpus=cpus),
        "-chardev",
        f"file,id=console,path={str(console).replace(',', ',,')}",
        "-serial",
        "chardev:console",
        "-drive",
        disk.argument(),
        "-device",
        "virtio-blk-pci,drive=boot-disk,bootindex=1",
    ]
    started = time.monotonic()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors)
        try:
            status: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            if process.poll() is None:
                process.kill()  # the pid we started, and only it
                process.wait()
        errors.seek(0)
        stderr = errors.read().decode(errors="replace").strip()
    seconds = time.monotonic() - started
    text = console.read_text(errors="replace") if console.exists() else ""
    if status is None:
        raise GuestBootFailed(
            f"{disk.drive} ({accel}) did not power off within {timeout:.0f} s; stopped it"
            + _tail(text)
        )
    if status != 0:
        raise GuestBootFailed(f"{QEMU} exited with {status}: {stderr}" + _tail(text))
    report = parse_report(text)
    return GuestReport(
        **{**report.__dict__, "accelerator": accel, "seconds": seconds, "console": text}
    )


def machine_arguments(accel: str, *, memory_mib: int = 512, cpus: int = 1) -> list[str]:
    """Everything but the disks and the console: a bare PC that cannot reach any network."""
    return [
        *(KVM if accel == "kvm" else TCG),
        "-machine",
        "pc",
        "-smp",
        str(cpus),
        "-m",
        str(memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-nic",
        "none",
        "-no-reboot",
        # SeaBIOS gives up on a disk it cannot boot after 1 s, which -no-reboot turns into an exit
        "-boot",
        "strict=on,reboot-timeout=1000",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]


def parse_report(console: str) -> GuestReport:
    """The guest's report in `console`, or GuestBootFailed when it is not complete."""
    lines = tuple(
        line[line.index(PREFIX) :].strip()
        for line in console.replace("\r", "").splitlines()
        if PREFIX in line
    )
    words = [line.removeprefix(PREFIX).strip().split(" ") for line in lines]
    booted = next((w for w in words if w[0] == "booted" and len(w) >= 6), None)
    done = next((w for w in words if w[0] == "done" and len(w) >= 3), None)
    if booted is None:
        raise GuestBootFailed("the guest never reported that it booted" + _tail(console))
    if done is None:
        raise GuestBootFailed("the guest stopped before it finished its report" + _tail(console))
    files = {}
    for w in words:
        if w[0] == "file" and len(w) >= 9:
            uid, _, gid = w[5].partition(":")
            content = base64.b64decode(w[9]) if len(w) > 9 else b""  # an empty file: no word
            files[w[1]] = GuestFile(w[1], int(w[3], 8), int(uid), int(gid), content)
    return GuestReport(
        kernel=booted[1],
        boot_id=booted[3],
        booted_uptime=float(booted[5]),
        done_uptime=float(done[2]),
        disks={w[1]: int(w[2]) for w in words if w[0] == "disk" and len(w) == 3},
        files=files,
        missing=tuple(w[1] for w in words if w[0] == "missing" and len(w) == 2),
        earlier_boots=tuple(w[1] for w in words if w[0] == "earlier" and len(w) == 2),
        clean=["root", "read-only"] in words,
        lines=lines,
    )


def _tail(console: str) -> str:
    lines = console.replace("\r", "").splitlines()[-CONSOLE_TAIL_LINES:]
    if not lines:
        return "; its console is empty"
    return "; the console ends with:\n" + "\n".join(lines)


@functools.cache
def choose_accelerator() -> str:
    """`kvm` where KVM runs a guest here, else `tcg` (IMGPREP_TEST_GUEST_ACCEL decides if set)."""
    chosen = os.environ.get(ACCEL_ENV, "").strip().lower()
    if chosen in ("kvm", "tcg"):
        return chosen
    return "kvm" if kvm_usable() else "tcg"


def kvm_usable(timeout: float = 15.0) -> bool:
    """KVM can run guests here: /dev/kvm opens, the CPU shows hardware virtualization (a nested
    PVM host offers /dev/kvm without it, and its guests hang), and the probe guest runs under
    `-accel kvm -cpu host`."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", _cpuinfo(), re.MULTILINE):
        return False
    return probe_runs("kvm", timeout)


def probe_runs(accel: str, timeout: float = 15.0) -> bool:
    """A probe guest — a boot sector that writes to qemu's debug-exit port — runs to its end
    under `accel` within `timeout` (a hung or aborted machine does not)."""
    with tempfile.TemporaryDirectory(prefix="imgprep-accel-probe-") as work:
        sector = Path(work) / "probe.img"
        with open(sector, "wb") as disk:
            disk.write(PROBE_BOOT_SECTOR)
            disk.truncate(2**20)  # SeaBIOS does not boot a disk of one sector
        argv = [
            QEMU,
            *machine_arguments(accel, memory_mib=64),
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive",
            BootDisk.file(sector, "raw").argument(),
            "-device",
            "virtio-blk-pci,drive=boot-disk,bootindex=1",
        ]
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return False
    return status == PROBE_EXIT_STATUS


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


# mov al, 0x31; out 0xf4, al; hlt — qemu's isa-debug-exit ends qemu with (0x31 << 1) | 1
PROBE_BOOT_SECTOR = bytes.fromhex("b031e6f4f4").ljust(510, b"\0") + b"\x55\xaa"
PROBE_EXIT_STATUS = (0x31 << 1) | 1
