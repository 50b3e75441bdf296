"""The helper's checks of request arguments, on real directories: every path must be exactly where
imgprep keeps that kind of thing, and nothing a caller sends can lead it elsewhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helper.checks import Refused, Roots, check_root_tree
from helper.loop_ledger import LoopLedger
from helper.operations import CAPABILITIES, check
from helper.protocol import OPERATIONS, REQUEST, AttachLoop, Unmount, WriteFiles
from helper.server import Helper, HelperConfig, Peer


@pytest.fixture
def roots(tmp_path: Path) -> Roots:
    for sub in ("cache", "instances/vm", "state/devices/vm/disk/root"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "instances" / "vm" / "disk").write_bytes(b"\0" * 512)
    return Roots.of(tmp_path / "cache", tmp_path / "instances", tmp_path / "state", ("ext4",))


@pytest.mark.root  # the helper accepts only root-owned trees (chown)
def test_work_area_entries_are_accepted_only_in_their_place(roots: Roots) -> None:
    area = roots.devices_dir / "vm" / "disk"
    assert roots.work_area_entry(str(area / "root")) == area / "root"
    for wrong in (
        "/etc/passwd",  # outside
        str(area),  # the area itself
        str(area / "other"),  # an entry imgprep never makes
        str(area / "root" / ".." / "root"),  # not normal
        str(area) + "//root",  # not normal
        "relative/root",
        str(roots.devices_dir / ".hidden" / "disk" / "root"),  # not an instance name
    ):
        with pytest.raises(Refused):
            roots.work_area_entry(wrong)


def test_a_symbolic_link_anywhere_on_the_path_is_refused(roots: Roots, tmp_path: Path) -> None:
    # Given a work area that is a link to a host directory (a worker that made one)
    (roots.devices_dir / "evil").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "disk").mkdir(parents=True)
    # Then a path through it is refused, though it looks like a work area
    with pytest.raises(Refused, match="symbolic link"):
        roots.work_area_entry(str(roots.devices_dir / "evil" / "disk" / "root"))


def test_instance_disks_and_cached_bases_must_be_regular_files(roots: Roots) -> None:
    assert roots.instance_disk(str(roots.instances_dir / "vm" / "disk"))
    with pytest.raises(Refused, match="does not exist"):
        roots.instance_disk(str(roots.instances_dir / "vm" / "missing"))
    (roots.instances_dir / "vm" / "dir").mkdir()
    with pytest.raises(Refused, match="not a regular file"):
        roots.instance_disk(str(roots.instances_dir / "vm" / "dir"))
    with pytest.raises(Refused, match="not an instance disk"):
        roots.instance_disk(str(roots.instances_dir / "vm"))
    with pytest.raises(Refused):
        roots.cached_base(str(roots.instances_dir / "vm" / "disk"))


def test_a_loop_device_over_a_file_outside_the_roots_is_refused(roots: Roots) -> None:
    ledger = LoopLedger(roots.state_dir.parent / "helper")
    with pytest.raises(Refused):
        check(AttachLoop(backing="/etc/shadow", offset=0, size=512), roots, ledger)
    checked = check(
        AttachLoop(backing=str(roots.instances_dir / "vm" / "disk"), offset=0, size=512),
        roots,
        ledger,
    )
    assert checked.loop == (str(roots.instances_dir / "vm" / "disk"), 0)


@pytest.mark.root  # the helper accepts only root-owned trees (chown)
def test_files_are_written_only_into_a_mounted_guest(roots: Roots) -> None:
    # Given the guest's mount point with nothing mounted on it
    target = roots.devices_dir / "vm" / "disk" / "root"
    request = WriteFiles(root=str(target), disk="vm/disk", files=())
    with pytest.raises(Refused, match="nothing is mounted"):
        check(request, roots, LoopLedger(roots.state_dir.parent / "helper"))


def test_every_operation_has_its_capabilities_and_nothing_more_than_it_needs() -> None:
    assert set(CAPABILITIES) == set(OPERATIONS)
    # nothing but these capabilities is ever held, and most operations hold one to three
    held = {cap for caps in CAPABILITIES.values() for cap in caps}
    # CHOWN, DAC_OVERRIDE, FOWNER, KILL, SETGID, SETUID, SYS_ADMIN
    assert held <= {0, 1, 3, 5, 6, 7, 21}
    assert CAPABILITIES["stop_daemons"] == CAPABILITIES["kill_daemons"] == (5,)  # KILL alone
    assert 21 not in CAPABILITIES["write_files"]  # writing files never mounts anything
    # the operations that start a FUSE daemon never read or write a file as root: the daemon,
    # which parses the worker's bytes, runs as the workers' user (setuid, setgid)
    for op in ("mount_fuse2fs", "start_storage_daemon"):
        assert set(CAPABILITIES[op]) == {6, 7, 21}, op


@pytest.mark.parametrize(
    "document",
    [
        {"op": "run_command", "argv": ["sh"]},
        {"op": "unmount", "target": "/x", "lazy": True},  # an extra field
        {"op": "attach_loop", "backing": "/x", "offset": "0", "size": 1},  # a string for a number
        {"op": "detach_loop", "device": "/dev/sda"},  # not a loop device
        ["unmount", "/x"],
        "[" * 200_000 + "]" * 200_000,  # nested deeper than any JSON parser goes
        '{"op": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}",
    ],
)
def test_malformed_and_unknown_requests_are_refused_and_logged(
    roots: Roots, tmp_path: Path, document: object, capsys: pytest.CaptureFixture[str]
) -> None:
    helper = Helper(
        HelperConfig(
            socket_path=tmp_path / "s",
            roots=roots,
            state_dir=tmp_path / "helper",
            allowed_uids=frozenset({0}),
            socket_gid=0,
        )
    )
    raw = document.encode() if isinstance(document, str) else json.dumps(document).encode()
    reply = helper.handle(raw, Peer(pid=1, uid=0, gid=0))
    assert not reply.ok and reply.error is not None
    assert reply.error.error_class == "PrivilegeRefused"
    assert "request_refused" in capsys.readouterr().out


def test_callers_it_does_not_serve_are_refused(roots: Roots, tmp_path: Path) -> None:
    helper = Helper(
        HelperConfig(
            socket_path=tmp_path / "s",
            roots=roots,
            state_dir=tmp_path / "helper",
            allowed_uids=frozenset({0, 999}),
            socket_gid=0,
        )
    )
    request = Unmount(target=str(roots.devices_dir / "vm" / "disk" / "root"))
    reply = helper.handle(request.model_dump_json().encode(), Peer(pid=1, uid=1234, gid=1234))
    assert reply.error is not None and "uid 1234 is not served" in reply.error.message


def test_requests_round_trip_as_json() -> None:
    request = REQUEST.validate_json(Unmount(target="/a/b").model_dump_json())
    assert request == Unmount(target="/a/b")


@pytest.mark.root  # the helper accepts only root-owned trees (chown)
def test_the_devices_tree_must_be_root_only_from_the_top(tmp_path: Path) -> None:
    devices = tmp_path / "open" / "devices"
    devices.mkdir(parents=True)
    check_root_tree(devices)  # root's, 0755 (pytest's tmp_path is root's too)
    for mode in (0o775, 0o757, 0o1777):  # group or others may write (sticky or not)
        devices.chmod(mode)
        with pytest.raises(Refused, match="other than root"):
            check_root_tree(devices)
    devices.chmod(0o755)
    os.chown(devices.parent, 4242, 4242)  # a directory above it that another user owns
    with pytest.raises(Refused, match="other than root"):
        check_root_tree(devices)
    os.chown(devices.parent, 0, 0)
    devices.parent.chmod(0o1777)  # above it, a root-owned sticky directory is fine (/tmp)
    check_root_tree(devices)


def test_a_loop_devices_recorded_backing_is_checked_by_name(roots: Roots) -> None:
    disk = roots.instances_dir / "vm" / "disk"
    export = roots.devices_dir / "vm" / "disk" / "export"
    assert roots.recorded_backing(str(disk)) == disk
    assert roots.recorded_backing(str(export)) == export
    for wrong in ("/etc/shadow", str(roots.instances_dir / "vm"), str(export.parent / "root")):
        with pytest.raises(Refused):
            roots.recorded_backing(wrong)
