"""The privileged helper against a compromised worker racing it: the worker owns the instance
disks and their directories, so between the helper's check of a path and the tool using it, it
can swap a disk for a link to a root-owned file. The helper must give the tools exactly what it
checked, and keep the device work areas where the worker cannot change anything."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from domain.core.errors import DeviceError, HelperUnavailable, PrivilegeRefused
from domain.core.runner import CommandError
from domain.guest.tools import daemons
from domain.guest.tools import mount as mounts
from harness import machine
from harness.privileges import HelperProcess, open_directory, unprivileged_user
from tests.integration.devices import need_devices
from tests.support.guests import MiB
from worker.privileges.helper_client import HelperClient

pytestmark = pytest.mark.slow

MARKER = b"ROOT-ONLY-SECRET"
ATTEMPTS = 40

# Run as the workers' user: swap `disk` between a hard link of `real` (a regular file the
# worker owns) and a symbolic link to `outside`, each swap one atomic rename, until killed.
SWAPPER = """
import os, sys
disk, real, outside = sys.argv[1:4]
link, file = disk + ".link", disk + ".file"
print("swapping", flush=True)
while True:
    os.symlink(outside, link)
    os.rename(link, disk)
    os.link(real, file)
    os.rename(file, disk)
"""

# Run as the workers' user: try to change the devices tree; the errno name of each attempt.
TAMPER = """
import errno, json, os, sys
devices, area = sys.argv[1:3]
attempts = {
    "create": lambda: os.mkdir(os.path.join(devices, "mine")),
    "create in an instance": lambda: os.mkdir(os.path.join(os.path.dirname(area), "mine")),
    "link in an area": lambda: os.symlink("/etc", os.path.join(area, "root")),
    "file in an area": lambda: open(os.path.join(area, "storage-daemon.pid"), "x").close(),
    "rename": lambda: os.rename(os.path.dirname(area), os.path.join(devices, "moved")),
    "remove": lambda: os.rmdir(area),
    "chmod": lambda: os.chmod(devices, 0o777),
}
found = {}
for name, attempt in attempts.items():
    try:
        attempt()
        found[name] = "done"
    except OSError as error:
        found[name] = errno.errorcode.get(error.errno or 0, str(error))
print(json.dumps(found))
"""


@pytest.fixture(autouse=True)
def _needs_devices() -> None:
    need_devices()


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A directory the workers' user can reach (pytest's tmp_path is root's alone)."""
    with open_directory("races") as root:
        yield root


def backing_of(device: str) -> str:
    path = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    try:
        return path.read_text().strip().removesuffix(" (deleted)")
    except OSError:  # detached meanwhile (ENOENT, ENODEV)
        return ""


def loop_backings() -> dict[str, str]:
    """Every attached loop device and the file the kernel says backs it."""
    return {
        f"/dev/{entry.name}": backing_of(entry.name)
        for entry in Path("/sys/block").iterdir()
        if entry.name.startswith("loop") and (entry / "loop" / "backing_file").exists()
    }


class LoopWatch:
    """Polls the kernel's loop devices in a thread and keeps every one backed by `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.seen: set[str] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.done.is_set():
            self.seen |= {d for d, backing in loop_backings().items() if backing == self.path}

    def __enter__(self) -> LoopWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=30)


def workers_disk(root: Path, make: Callable[[Path], object]) -> tuple[Path, Path]:
    """The workers' instance disk `instances/vm/disk` and the file it is a hard link to (made
    by `make`), both the workers' user's: what the swapper turns into a link and back."""
    user = unprivileged_user()
    instance = root / "instances" / "vm"
    instance.mkdir()
    real = instance / "real"
    make(real)
    disk = instance / "disk"
    os.link(real, disk)
    for path in (instance, real):
        os.chown(path, user.pw_uid, user.pw_gid)
    return disk, real


def assert_refused_for_links(refused: list[str]) -> None:
    """Every refusal names a link, a file that is not regular, or a path that changed."""
    odd = [
        why
        for why in refused
        if not ("symbolic link" in why or "regular file" in why or "changed while" in why)
    ]
    assert odd == []


def test_a_disk_swapped_for_a_link_during_attach_never_backs_a_loop_device(
    open_root: Path,
) -> None:
    # Given a helper, an instance directory of the workers' user with its disk, and a root-only
    # file outside the helper's roots
    outside = open_root / "outside"
    outside.write_bytes(MARKER * (MiB // len(MARKER)))
    outside.chmod(0o600)
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        disk, real = workers_disk(open_root, lambda real: real.write_bytes(b"\0" * MiB))

        # When the worker swaps the disk for a link to that file in a tight loop while the
        # helper is asked, again and again, for a loop device over the disk
        attached: list[tuple[str, str, bytes]] = []
        refused: list[str] = []
        unanswered: list[str] = []
        try:
            with swapping(disk, real, outside), LoopWatch(outside) as watch:
                for _ in range(ATTEMPTS):
                    try:
                        device = client.attach_loop(disk, offset=0, size=MiB)
                    except (PrivilegeRefused, DeviceError) as error:
                        refused.append(str(error))
                        continue
                    except HelperUnavailable as error:  # the request died in the helper
                        unanswered.append(str(error))
                        continue
                    with open(device, "rb") as block:
                        attached.append((device, backing_of(device), block.read(len(MARKER))))
                    # released here, as root: the helper would not detach a device over a
                    # file it did not attach, and the disk's name may be a link right now
                    subprocess.run(["losetup", "--detach", device], check=True)
        finally:
            for device, backing in loop_backings().items():
                if backing == str(outside):  # what the defect leaks: released as root
                    subprocess.run(["losetup", "--detach", device], check=False)

        # Then no loop device was ever over the outside file, as the kernel tells it
        assert watch.seen == set()
        # and every reply was a refusal or a device over the worker's own disk
        assert all(backing in (str(disk), str(real)) for _, backing, _ in attached), attached
        assert all(head == b"\0" * len(MARKER) for _, _, head in attached), attached
        assert_refused_for_links(refused)
        # and every request was answered
        assert unanswered == []
        # (the race was run: some requests met the link, some the file)
        assert attached and refused
    # and every device is released
    assert machine.loop_devices_backed_by(open_root) == []
    assert str(outside) not in loop_backings().values()


@contextlib.contextmanager
def swapping(disk: Path, real: Path, outside: Path) -> Iterator[None]:
    """The workers' user swapping `disk` between `real` and a link to `outside` until the block
    ends (the swapper is stopped by the pid this started)."""
    user = unprivileged_user()
    swapper = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(disk), str(real), str(outside)],
        stdout=subprocess.PIPE,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
    )
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == b"swapping\n"
        yield
    finally:
        swapper.kill()
        swapper.wait(timeout=30)


def ext4_image(path: Path, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as content:
        for name, data in files.items():
            (Path(content) / name).write_bytes(data)
        path.write_bytes(b"")
        os.truncate(path, 8 * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", content, str(path)], check=True)


def test_a_disk_swapped_for_a_link_during_fuse2fs_mounts_is_never_mounted(
    open_root: Path,
) -> None:
    # Given a helper, a work area it made, the worker's ext4 disk and, outside the helper's
    # roots, a root-only ext4 image holding a secret
    outside = open_root / "outside.img"
    ext4_image(outside, {"secret": MARKER})
    outside.chmod(0o600)
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        disk, real = workers_disk(open_root, lambda real: ext4_image(real, {"mine": b"guest"}))
        area = helper.devices_dir / "vm" / "disk"
        client.make_work_area(area)
        target = area / "root"

        # When the helper is asked again and again to mount the disk while the worker swaps it
        seen: list[list[str]] = []
        refused: list[str] = []
        with swapping(disk, real, outside):
            for _ in range(30):
                try:
                    client.mount_fuse2fs(disk, target, offset=0)
                except (PrivilegeRefused, DeviceError, CommandError) as error:
                    refused.append(str(error))
                    continue
                pids = daemons.find("fuse2fs", target)
                seen.append(sorted(entry.name for entry in target.iterdir()))
                client.unmount(target)
                assert daemons.wait_gone(pids, 60) == []

        # Then only the worker's own filesystem was ever mounted
        assert all(names == ["lost+found", "mine"] for names in seen), seen
        assert_refused_for_links(refused)
        assert refused
        # and the helper removes the work area afterwards
        assert client.remove_work_area(area) is True
    assert machine.mounts_under(open_root) == []
    assert machine.processes_mentioning(open_root) == []


def qcow2_image(path: Path, head: bytes) -> None:
    raw = path.with_suffix(".raw")
    raw.write_bytes(head)
    os.truncate(raw, MiB)
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()


def test_a_disk_swapped_for_a_link_during_exports_is_never_exported(open_root: Path) -> None:
    # Given a helper, a work area it made, the worker's qcow2 overlay and, outside the helper's
    # roots, a root-only qcow2 image holding a secret
    outside = open_root / "outside.qcow2"
    qcow2_image(outside, MARKER)
    outside.chmod(0o600)
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        disk, real = workers_disk(open_root, lambda real: qcow2_image(real, b"\0" * len(MARKER)))
        area = helper.devices_dir / "vm" / "disk"
        client.make_work_area(area)
        export, pidfile = area / "export", area / "storage-daemon.pid"

        # When qemu-storage-daemon is asked again and again to export the overlay while the
        # worker swaps it
        heads: list[bytes] = []
        refused: list[str] = []
        with swapping(disk, real, outside):
            for _ in range(20):
                try:
                    client.start_storage_daemon(
                        disk, backing=None, backing_format=None, export=export, pidfile=pidfile
                    )
                except (PrivilegeRefused, DeviceError, CommandError) as error:
                    refused.append(str(error))
                    continue
                with open(export, "rb") as exported:
                    heads.append(exported.read(len(MARKER)))
                client.stop_daemons("qemu-storage-daemon", export, timeout=30)
                if mounts.is_mounted(export):
                    client.unmount(export)

        # Then only the worker's own overlay was ever exported
        assert all(head == b"\0" * len(MARKER) for head in heads), heads
        assert_refused_for_links(refused)
        assert refused
        assert client.remove_work_area(area) is True
    assert machine.mounts_under(open_root) == []
    assert machine.processes_mentioning(open_root) == []


def test_the_worker_cannot_change_the_devices_tree(open_root: Path) -> None:
    # Given a helper and a work area it made at a worker's request
    user = unprivileged_user()
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        devices = helper.devices_dir
        area = devices / "vm" / "disk"
        client.make_work_area(area)
        assert area.is_dir() and area.stat().st_uid == 0

        # When the workers' user tries to create, link, rename, remove or open up anything there
        tamper = subprocess.run(
            [sys.executable, "-c", TAMPER, str(devices), str(area)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            user=user.pw_uid,  # the child drops to the workers' user: setgid, setuid
            group=user.pw_gid,
            extra_groups=[],
        )

        # Then each attempt is refused by the kernel
        found = json.loads(tamper.stdout)
        assert set(found.values()) <= {"EACCES", "EPERM"}, found
        assert sorted(path.name for path in area.iterdir()) == []
        # and the helper removes the area (and its instance's directory) when asked
        assert client.remove_work_area(area) is True
        assert not (devices / "vm").exists()
        # and refuses a work area anywhere else
        with pytest.raises(PrivilegeRefused, match="outside the device work areas"):
            client.make_work_area(open_root / "state" / "devices" / "vm" / "disk")
    assert machine.loop_devices_backed_by(open_root) == []


def helper_argv(root: Path, devices: Path) -> list[str]:
    argv = [sys.executable, "-m", "helper", "--socket", str(root / "run" / "helper.sock")]
    argv += ["--cache-dir", str(root / "cache"), "--instances-dir", str(root / "instances")]
    argv += ["--state-dir", str(root / "state"), "--helper-state-dir", str(root / "hs")]
    return [*argv, "--devices-dir", str(devices), "--user", "imgprep"]


@pytest.mark.parametrize("owned_by_worker", ["devices", "parent"])
def test_the_helper_will_not_start_on_a_devices_tree_the_worker_can_change(
    open_root: Path, owned_by_worker: str
) -> None:
    # Given a devices directory that the workers' user owns, or whose parent it owns
    user = unprivileged_user()
    for sub in ("cache", "instances", "state"):
        (open_root / sub).mkdir()
    parent = open_root / "parent"
    devices = parent / "devices"
    devices.mkdir(parents=True)
    os.chown(parent if owned_by_worker == "parent" else devices, user.pw_uid, user.pw_gid)

    # When the helper starts with it
    started = subprocess.run(
        helper_argv(open_root, devices), capture_output=True, text=True, timeout=60, check=False
    )

    # Then it refuses to run, and says why
    assert started.returncode != 0
    assert "will not start" in started.stderr
    assert "can be changed by a user other than root" in started.stderr
    assert not (open_root / "run" / "helper.sock").exists()


def test_a_devices_tree_opened_up_after_start_is_refused_at_the_next_request(
    open_root: Path,
) -> None:
    # Given a running helper
    user = unprivileged_user()
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        devices = helper.devices_dir
        # When its devices directory is handed to the workers' user
        os.chown(devices, user.pw_uid, user.pw_gid)
        try:
            # Then the next request for a work area is refused
            with pytest.raises(PrivilegeRefused, match="other than root"):
                client.make_work_area(devices / "vm" / "disk")
        finally:
            os.chown(devices, 0, 0)
        assert not (devices / "vm").exists()
