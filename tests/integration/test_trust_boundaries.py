"""The privileged helper never opens a file that a worker's bytes name (issue 19, item 1).

The workers' user owns its instance disks and cache entries, so it can write any header into
them: a qcow2 external data file, an ext4 journal device. The tools that parse those bytes
(qemu-storage-daemon, fuse2fs) open what the bytes name; run by the helper as root they read and
wrote root-only files. Here the attacker is the workers' user talking to the helper directly,
as a compromised worker would, and the root-only file must be neither read nor changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.core.errors import HelperUnavailable, PrivilegeRefused
from domain.core.runner import CommandError
from domain.guest.tools import daemons
from domain.guest.tools import mount as mounts
from harness import machine
from harness.privileges import HelperProcess, open_directory, unprivileged_user
from helper import capabilities
from helper.server import MAX_CONNECTIONS, REQUEST_SECONDS
from tests.integration.devices import need_devices
from tests.support.guests import MiB
from worker.privileges.helper_client import HelperClient

pytestmark = pytest.mark.slow

SECRET = b"ROOT-ONLY-SECRET"
LONG_AGO = 1_000_000_000.0  # an access time any read would move (relatime: older than a day)
EXTERNAL_DATA_FILE_BIT = 1 << 2
RAW_DATA_FILE_BIT = 1 << 1  # autoclear: the data file holds the guest's bytes as they are
DATA_EXTENSION = struct.pack(">I", 0x44415441)
OTHER_EXTENSION = struct.pack(">I", 0x1D5E7E57)  # an optional extension qemu ignores

# Run as the workers' user: rewrite the qcow2 header in place (same inode, one pwrite each),
# between a header that names nothing and one that names the root-only data file, until killed.
REWRITER = """
import os, sys
path, clean, evil = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
print("rewriting", flush=True)
while True:
    os.pwrite(fd, evil, 0)
    os.pwrite(fd, clean, 0)
"""


@pytest.fixture(autouse=True)
def _needs_devices() -> None:
    need_devices()


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A directory the workers' user can reach (pytest's tmp_path is root's alone)."""
    with open_directory("trust") as root:
        yield root


class RootOnly:
    """A root-only file holding a secret, whose reads and changes can be told afterwards."""

    def __init__(self, path: Path, size: int = MiB) -> None:
        self.path = path
        path.write_bytes(SECRET * (size // len(SECRET)))
        path.chmod(0o600)
        self.baseline()

    def baseline(self) -> None:
        """What the file is now, to compare with: its access time set long ago."""
        self.digest = self._digest()
        os.utime(self.path, (LONG_AGO, self.path.stat().st_mtime))
        status = self.path.stat()
        self.mtime_ns, self.ctime_ns = status.st_mtime_ns, status.st_ctime_ns

    def _digest(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def assert_untouched(self) -> None:
        status = self.path.stat()
        assert status.st_atime == LONG_AGO, "the root-only file was read"
        assert (status.st_mtime_ns, status.st_ctime_ns) == (self.mtime_ns, self.ctime_ns)
        assert self._digest() == self.digest, "the root-only file was changed"


def qcow2_naming_data_file(path: Path, data_file: Path, owned_data_file: Path) -> None:
    """A qcow2 at `path` whose header names `data_file` as its external data file: made with
    `owned_data_file` (a name of the same length), then that name patched in the header, as
    a worker would."""
    assert len(str(data_file)) == len(str(owned_data_file))
    owned_data_file.write_bytes(b"\0" * MiB)
    subprocess.run(
        [
            "qemu-img", "create", "-q", "-f", "qcow2",
            "-o", f"data_file={owned_data_file},data_file_raw=on", str(path), "1M",
        ],
        check=True,
    )  # fmt: skip
    image = path.read_bytes()
    assert image.count(str(owned_data_file).encode()) == 1
    path.write_bytes(image.replace(str(owned_data_file).encode(), str(data_file).encode()))


def without_data_file(header: bytes) -> bytes:
    """The same header naming no data file: the feature bits cleared, the extension renamed."""
    patched = bytearray(header)
    (incompatible,) = struct.unpack_from(">Q", patched, 72)
    struct.pack_into(">Q", patched, 72, incompatible & ~EXTERNAL_DATA_FILE_BIT)
    (autoclear,) = struct.unpack_from(">Q", patched, 88)
    struct.pack_into(">Q", patched, 88, autoclear & ~RAW_DATA_FILE_BIT)
    at = patched.find(DATA_EXTENSION)
    patched[at : at + 4] = OTHER_EXTENSION
    return bytes(patched)


def workers(*paths: Path) -> None:
    user = unprivileged_user()
    for path in paths:
        os.chown(path, user.pw_uid, user.pw_gid)


def refusals(helper: HelperProcess) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in helper.log_path.read_text().splitlines() if line]
    return [line for line in lines if line.get("event") == "request_refused"]


def assert_nothing_left(root: Path) -> None:
    assert machine.mounts_under(root) == []
    assert machine.processes_mentioning(root) == []
    assert machine.loop_devices_backed_by(root) == []


def test_an_overlay_naming_a_root_only_data_file_is_refused_and_the_file_untouched(
    open_root: Path,
) -> None:
    # Given a root-only file, and an instance disk of the worker's whose qcow2 header names it
    # as its external data file
    secret = RootOnly(open_root / "secret-file")
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        instance = open_root / "instances" / "vm"
        instance.mkdir()
        disk = instance / "disk"
        qcow2_naming_data_file(disk, secret.path, open_root / "owned-file0")
        workers(instance, disk, open_root / "owned-file0")
        area = helper.devices_dir / "vm" / "disk"
        client.make_work_area(area)

        # When the worker asks the helper to export that disk
        with pytest.raises(PrivilegeRefused, match="external data file") as refused:
            client.start_storage_daemon(
                disk,
                backing=None,
                backing_format=None,
                export=area / "export",
                pidfile=area / "storage-daemon.pid",
            )

        # Then it is refused, naming the file, and the refusal is logged with the caller
        assert str(secret.path) in str(refused.value)
        logged = refusals(helper)
        assert [line["op"] for line in logged] == ["start_storage_daemon"]
        assert "external data file" in str(logged[0]["reason"])
        # and nothing was exported or left running
        assert not mounts.is_mounted(area / "export")
        assert daemons.find("qemu-storage-daemon", area / "export") == []
        assert client.remove_work_area(area) is True
    # and the root-only file was neither read nor changed
    secret.assert_untouched()
    assert_nothing_left(open_root)


def test_a_qcow2_cache_entry_naming_a_root_only_data_file_is_refused(open_root: Path) -> None:
    # Given a cache entry of the worker's (a qcow2 base, as with force_raw off) whose header
    # names a root-only file as its data file, and an overlay of it
    secret = RootOnly(open_root / "secret-file")
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        entry = open_root / "cache" / ("a" * 40)
        qcow2_naming_data_file(entry, secret.path, open_root / "owned-file0")
        instance = open_root / "instances" / "vm"
        instance.mkdir()
        disk = instance / "disk"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(entry),
             "-u", str(disk), "1M"],
            check=True,
        )  # fmt: skip
        workers(entry, instance, disk, open_root / "owned-file0")
        area = helper.devices_dir / "vm" / "disk"
        client.make_work_area(area)

        # When the worker asks for the overlay's export over that base
        with pytest.raises(PrivilegeRefused, match="external data file"):
            client.start_storage_daemon(
                disk,
                backing=entry,
                backing_format="qcow2",
                export=area / "export",
                pidfile=area / "storage-daemon.pid",
            )

        # Then it is refused and logged, and nothing is exported
        assert [line["op"] for line in refusals(helper)] == ["start_storage_daemon"]
        assert not mounts.is_mounted(area / "export")
        assert client.remove_work_area(area) is True
    secret.assert_untouched()
    assert_nothing_left(open_root)


@contextlib.contextmanager
def rewriting(path: Path, clean: bytes, evil: bytes) -> Iterator[None]:
    """The workers' user rewriting the header of `path` in place until the block ends."""
    user = unprivileged_user()
    rewriter = subprocess.Popen(
        [sys.executable, "-c", REWRITER, str(path), clean.hex(), evil.hex()],
        stdout=subprocess.PIPE,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
    )
    try:
        assert rewriter.stdout is not None and rewriter.stdout.readline() == b"rewriting\n"
        yield
    finally:
        rewriter.kill()
        rewriter.wait(timeout=30)


def test_a_header_rewritten_while_the_export_starts_never_reaches_the_root_only_file(
    open_root: Path,
) -> None:
    # Given an overlay of the worker's whose header the worker flips, in place, between naming
    # nothing and naming a root-only data file, while the helper is asked to export it
    secret = RootOnly(open_root / "secret-file")
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        instance = open_root / "instances" / "vm"
        instance.mkdir()
        disk = instance / "disk"
        qcow2_naming_data_file(disk, secret.path, open_root / "owned-file0")
        workers(instance, disk, open_root / "owned-file0")
        evil = disk.read_bytes()[:4096]
        clean = without_data_file(evil)
        area = helper.devices_dir / "vm" / "disk"
        client.make_work_area(area)
        export = area / "export"

        # When the export is asked for again and again during the rewrites
        outcomes: list[str] = []
        failures: list[str] = []
        heads: list[bytes] = []
        with rewriting(disk, clean, evil):
            for _ in range(25):
                try:
                    client.start_storage_daemon(
                        disk,
                        backing=None,
                        backing_format=None,
                        export=export,
                        pidfile=area / "storage-daemon.pid",
                    )
                except PrivilegeRefused:
                    outcomes.append("refused")
                    continue
                except CommandError as error:  # qemu, as the worker, could not open the file
                    failures.append(str(error))
                    continue
                outcomes.append("exported")
                with contextlib.suppress(OSError), open(export, "rb") as exported:
                    heads.append(exported.read(MiB))
                client.stop_daemons("qemu-storage-daemon", export, timeout=30)
                if mounts.is_mounted(export):
                    client.unmount(export)

        # Then the secret was never exported, and every refusal is typed and logged; a header
        # flipped after the check reached qemu, which, as the worker, could not open the data
        # file (or found the header torn): a failure of qemu's, typed, never the secret
        assert all(SECRET not in head for head in heads)
        assert all(failure.startswith("qemu-storage-daemon") for failure in failures), failures
        assert "refused" in outcomes, outcomes
        assert len(refusals(helper)) == outcomes.count("refused")
        assert client.remove_work_area(area) is True
    # and the root-only file was neither read nor changed
    secret.assert_untouched()
    assert_nothing_left(open_root)


def reads_of(device: str) -> int:
    """Read requests the block device has completed (its /sys stat, first field)."""
    return int((Path("/sys/block") / Path(device).name / "stat").read_text().split()[0])


def test_an_ext4_naming_a_host_block_device_as_its_journal_never_opens_it(
    open_root: Path,
) -> None:
    # Given a root-only block device that holds an ext4 journal (a loop device over a root-only
    # file), and a raw instance disk of the worker's: an ext4 whose superblock names that
    # journal by UUID and says it needs recovery
    journal_file = RootOnly(open_root / "journal-file", size=8 * MiB)
    journal_uuid = str(uuid.uuid4())
    subprocess.run(
        ["mke2fs", "-q", "-F", "-O", "journal_dev", "-b", "4096", "-U", journal_uuid,
         str(journal_file.path)],
        check=True,
    )  # fmt: skip
    journal = subprocess.run(
        ["losetup", "--find", "--show", str(journal_file.path)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        with HelperProcess.start(open_root) as helper:
            client = HelperClient(helper.socket_path)
            instance = open_root / "instances" / "vm"
            instance.mkdir()
            disk = instance / "disk"
            disk.write_bytes(b"")
            os.truncate(disk, 32 * MiB)
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-b", "4096", "-J", f"device={journal}", str(disk)],
                check=True,
            )
            subprocess.run(
                ["debugfs", "-w", "-R", "feature needs_recovery", str(disk)],
                check=True, capture_output=True,
            )  # fmt: skip
            workers(instance, disk)
            area = helper.devices_dir / "vm" / "disk"
            client.make_work_area(area)
            subprocess.run(["sync"], check=True)  # mkfs wrote the journal device's superblock
            journal_file.baseline()
            reads = reads_of(journal)

            # When the worker asks the helper to mount that disk with fuse2fs
            with pytest.raises(CommandError):
                client.mount_fuse2fs(disk, area / "root", offset=0)

            # Then nothing is mounted, and the journal device was never read
            assert not mounts.is_mounted(area / "root")
            time.sleep(0.5)  # block statistics are updated as requests complete
            assert reads_of(journal) == reads
            assert client.remove_work_area(area) is True
    finally:
        subprocess.run(["losetup", "--detach", journal], check=False)
    journal_file.assert_untouched()
    assert_nothing_left(open_root)


def test_the_fuse_daemons_run_as_the_workers_user_without_capabilities(open_root: Path) -> None:
    # Given a helper and the worker's qcow2 overlay of an ext4 filesystem
    user = unprivileged_user()
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        instance = open_root / "instances" / "vm"
        instance.mkdir()
        raw = open_root / "fs.raw"
        raw.write_bytes(b"")
        os.truncate(raw, 16 * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
        disk = instance / "disk"
        subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
            check=True,
        )
        workers(instance, disk)
        area = helper.devices_dir / "vm" / "disk"
        client.make_work_area(area)
        export, target = area / "export", area / "root"

        # When the helper exports it and mounts the export with fuse2fs
        client.start_storage_daemon(
            disk, backing=None, backing_format=None, export=export,
            pidfile=area / "storage-daemon.pid",
        )  # fmt: skip
        client.mount_fuse2fs(export, target, offset=0)
        try:
            # Then both daemons are the workers' user's processes, with no capability at all
            pids = daemons.find("qemu-storage-daemon", export) + daemons.find("fuse2fs", target)
            assert len(pids) == 2
            for pid in pids:
                assert capabilities.uids(pid) == (user.pw_uid,) * 4
                held = capabilities.sets(pid)
                assert held["CapEff"] == held["CapPrm"] == held["CapAmb"] == 0
            # and the guest is mounted where the helper said, for root and that user only
            assert sorted(p.name for p in target.iterdir()) == ["lost+found"]
            assert area.stat().st_mode & 0o777 == 0o750
            assert area.stat().st_gid == user.pw_gid
        finally:
            fuse2fs_pids = daemons.find("fuse2fs", target)
            client.unmount(target)
            assert daemons.wait_gone(fuse2fs_pids, 60) == []
            client.stop_daemons("qemu-storage-daemon", export, timeout=30)
            if mounts.is_mounted(export):
                client.unmount(export)
        assert client.remove_work_area(area) is True
    assert_nothing_left(open_root)


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise LookupError(pid)


def connect(path: Path) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(str(path))
    return connection


def test_idle_connections_cannot_hold_the_helper(open_root: Path) -> None:
    # Given a helper
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        before = threads_of(helper.process.pid)

        # When a caller opens many more connections than it serves and sends nothing (one
        # trickles a byte now and then)
        idle = [connect(helper.socket_path) for _ in range(4 * MAX_CONNECTIONS)]
        trickling = idle[0]
        opened = time.monotonic()
        try:
            time.sleep(1.0)
            trickling.send(b"{")

            # Then the helper holds a thread for at most as many as it serves at once
            assert threads_of(helper.process.pid) <= before + MAX_CONNECTIONS
            # and a caller beyond them is answered at once that it is busy (transient)
            with pytest.raises(HelperUnavailable, match="connections; try again"):
                client.ping()
            # and every idle connection is answered and closed within the request time
            for connection in idle:
                connection.settimeout(REQUEST_SECONDS + 20)
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
                assert answer.endswith(b"\n")
            assert time.monotonic() - opened < REQUEST_SECONDS + 20
        finally:
            for connection in idle:
                connection.close()

        # and then the helper serves again, with its threads back
        assert client.ping()["devices_dir"] == str(helper.devices_dir)
        assert threads_of(helper.process.pid) <= before + 2
        logged = [line["reason"] for line in refusals(helper)]
        assert any("no complete request within" in str(reason) for reason in logged)


def test_a_request_nested_too_deeply_is_refused_and_logged(open_root: Path) -> None:
    # Given a helper
    with HelperProcess.start(open_root) as helper:
        # When a caller sends JSON nested deeper than any parser goes
        with connect(helper.socket_path) as connection:
            connection.sendall(b"[" * 200_000 + b"]" * 200_000 + b"\n")
            connection.shutdown(socket.SHUT_WR)
            connection.settimeout(30)
            raw = b""
            while chunk := connection.recv(65536):
                raw += chunk

        # Then it is answered PrivilegeRefused, and the refusal is logged
        reply = json.loads(raw)
        assert reply["ok"] is False and reply["error"]["error_class"] == "PrivilegeRefused"
        assert "nested too deeply" in reply["error"]["message"]
        assert any("nested too deeply" in str(line["reason"]) for line in refusals(helper))
        # and the helper still serves
        assert HelperClient(helper.socket_path).ping()
        assert "Traceback" not in helper.log_path.read_text()


def ext4_disk(root: Path, instance: str) -> Path:
    """A raw ext4 instance disk of the worker's, `instances/<instance>/disk`."""
    folder = root / "instances" / instance
    folder.mkdir()
    disk = folder / "disk"
    disk.write_bytes(b"")
    os.truncate(disk, 16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True)
    workers(folder, disk)
    return disk


def test_a_daemons_namespace_does_not_keep_other_disks_mounted(open_root: Path) -> None:
    # Given two disks mounted by the helper, the second while the first is mounted (a new
    # mount namespace starts with a copy of every mount of the host's)
    with HelperProcess.start(open_root) as helper:
        client = HelperClient(helper.socket_path)
        first, second = helper.devices_dir / "vm1" / "disk", helper.devices_dir / "vm2" / "disk"
        for instance, area in (("vm1", first), ("vm2", second)):
            client.make_work_area(area)
            client.mount_fuse2fs(ext4_disk(open_root, instance), area / "root", offset=0)
        try:
            # When the first is unmounted while the second's daemon runs
            pids = daemons.find("fuse2fs", first / "root")
            client.unmount(first / "root")

            # Then the first's daemon writes back and exits at once: no copy of its mount in
            # the second daemon's namespace keeps its filesystem alive
            assert pids and daemons.wait_gone(pids, 20) == []
        finally:
            for area in (first, second):
                pids = daemons.find("fuse2fs", area / "root")
                if mounts.is_mounted(area / "root"):
                    client.unmount(area / "root")
                assert daemons.wait_gone(pids, 60) == []
                assert client.remove_work_area(area) is True
    assert_nothing_left(open_root)
