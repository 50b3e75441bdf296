"""Device steps on the ports' fakes (tests.fakes): teardown from any recorded state, one
operation's record left alone by another, device allocation, mount methods, and step inputs
that name paths outside the roots."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from domain.core.errors import (
    FilesystemRefused,
    InvalidRequest,
    NoFreeDevice,
)
from domain.core.models import (
    CachedImage,
    FileInjection,
    InstanceDisk,
    PreparedDisk,
)
from domain.core.runner import Runner
from domain.disks.device_records import LoopDevice, Mount, StorageDaemon, WorkDir
from domain.guest.context import (
    Claim,
    DeviceContext,
    GuestPartition,
    KernelMount,
    MappedDisk,
    MountedDisk,
    check_disk,
)
from domain.guest.devices import allocate
from domain.guest.injection import inject_files
from domain.guest.mounting import check_ext_fits, mount_method
from domain.guest.teardown import release_devices
from tests.fakes.device_ledger import InMemoryDeviceLedger
from tests.fakes.locks import InMemoryLocks


@dataclass(frozen=True)
class MountSettings:
    """A MountPolicy (worker.settings.MountSettings has the same fields and defaults)."""

    allowed_filesystems: tuple[str, ...] = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat")
    kernel_mount: KernelMount = "never"
    device_wait_seconds: float = 30.0
    stop_timeout_seconds: float = 30.0


@pytest.fixture
def ports() -> Ports:
    return Ports(InMemoryDeviceLedger(), InMemoryLocks(wait=1))


class Ports:
    """The ports the device steps of one host share."""

    def __init__(self, ledger: InMemoryDeviceLedger, locks: InMemoryLocks) -> None:
        self.ledger = ledger
        self.locks = locks


def context(ports: Ports, state_dir: Path, owner: str = "op-a") -> DeviceContext:
    return DeviceContext(
        runner=Runner(default_timeout=30),
        ledger=ports.ledger,
        locks=ports.locks,
        policy=MountSettings(stop_timeout_seconds=2),
        state_dir=state_dir,
        instances_dir=state_dir / "instances",
        cache_dir=state_dir / "cache",
        host="host-1",
        owner=owner,
        worker="w1@h",
    )


def test_teardown_from_a_record_whose_resources_are_already_gone(
    ports: Ports, tmp_path: Path
) -> None:
    # Given a record naming every kind of resource, none of which exists any more (a crash
    # after the record was written and before, or after, each resource was made)
    ctx = context(ports, tmp_path)
    area = ctx.work_area("vm/disk")
    area.path.mkdir(parents=True)
    (area.path / "root").mkdir()
    claim = Claim(ctx.ledger, ctx.ledger.claim("vm/disk", "op-a", "w1"))
    claim.note(WorkDir(path=str(area.path)))
    claim.note(StorageDaemon(export=str(area.export), pidfile=str(area.pidfile)))
    claim.note(LoopDevice(backing=str(area.export), offset=0, size=1))
    claim.note(Mount(mount_dir=str(area.mount_dir), method="fuse2fs"))

    # When teardown runs, twice
    assert release_devices("vm/disk", ctx) is True
    assert release_devices("vm/disk", ctx) is False

    # Then the record and the work area are gone, and no lock is left
    assert ctx.ledger.get("vm/disk") is None
    assert not area.path.exists() and not area.path.parent.exists()
    assert ports.locks.held == {}


def test_teardown_leaves_another_operations_record_alone(ports: Ports, tmp_path: Path) -> None:
    mine = context(ports, tmp_path, owner="op-a")
    Claim(mine.ledger, mine.ledger.claim("vm/disk", "op-a", "w1")).note(WorkDir(path="/nowhere"))
    assert release_devices("vm/disk", context(ports, tmp_path, owner="op-b")) is False
    assert mine.ledger.get("vm/disk") is not None
    assert (
        release_devices("vm/disk", context(ports, tmp_path, owner="op-b"), any_owner=True) is True
    )


def test_allocation_waits_for_a_free_device_then_gives_up() -> None:
    attempts: list[int] = []

    def busy_twice() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise NoFreeDevice("all loop devices are in use")
        return "/dev/loop9"

    assert allocate(busy_twice, wait_seconds=5, pause=0.01) == "/dev/loop9"
    assert len(attempts) == 3

    def never() -> str:
        raise NoFreeDevice("all loop devices are in use")

    with pytest.raises(NoFreeDevice):
        allocate(never, wait_seconds=0.05, pause=0.01)


@pytest.mark.parametrize(
    ("fstype", "setting", "expected"),
    [
        ("ext4", "never", "fuse2fs"),
        ("ext4", "fallback", "fuse2fs"),
        ("ext4", "always", "kernel"),
        ("xfs", "fallback", "kernel"),
        ("xfs", "always", "kernel"),
    ],
)
def test_mount_method_follows_the_setting(fstype: str, setting: Any, expected: str) -> None:
    policy = MountSettings(kernel_mount=setting)
    assert mount_method(fstype, policy, have_fuse2fs=True) == expected


def test_no_userspace_driver_and_no_kernel_mounts_is_refused() -> None:
    with pytest.raises(FilesystemRefused, match="IMGPREP_MOUNT__KERNEL_MOUNT"):
        mount_method("xfs", MountSettings(), have_fuse2fs=True)


def test_an_ext_filesystem_larger_than_its_partition_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "fs"
    with open(image, "wb") as handle:
        handle.truncate(8 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    check_ext_fits(image, offset=0, size=8 * 2**20, where="p1")
    with pytest.raises(FilesystemRefused, match="claims 8388608 bytes but its partition holds"):
        check_ext_fits(image, offset=0, size=4 * 2**20, where="p1")


def instance_disk(path: Path, backing: str | None = None) -> InstanceDisk:
    return InstanceDisk(
        host="host-1",
        instance_id="vm",
        disk_name="disk",
        path=str(path),
        format="qcow2" if backing else "raw",
        virtual_size=1,
        backing_file=backing,
        backing_format="raw" if backing else None,
    )


def test_step_inputs_naming_paths_outside_the_roots_are_refused(
    ports: Ports, tmp_path: Path
) -> None:
    # Given the instance disk where imgprep would have put it
    ctx = context(ports, tmp_path)
    disk_path = ctx.instances_dir / "vm" / "disk"
    disk_path.parent.mkdir(parents=True)
    disk_path.write_bytes(b"\0" * 512)
    (disk_path.parent / "disk.info").write_text('{"disk": "raw"}')
    check_disk(instance_disk(disk_path), ctx)

    # Then a message naming another file, a backing file outside the cache, a format other
    # than the recorded one (a raw disk read as qcow2 follows the header its guest wrote), a
    # backing file that is no complete cache entry, or a link, is refused
    with pytest.raises(InvalidRequest, match="is not the instance disk path"):
        check_disk(instance_disk(Path("/etc/passwd")), ctx)
    with pytest.raises(InvalidRequest, match="recorded as raw, not qcow2"):
        check_disk(instance_disk(disk_path, backing=str(ctx.cache_dir / ("0" * 40))), ctx)
    (disk_path.parent / "disk.info").write_text('{"disk": "qcow2"}')
    with pytest.raises(InvalidRequest, match="not an entry of the image cache"):
        check_disk(instance_disk(disk_path, backing="/etc/shadow"), ctx)
    with pytest.raises(InvalidRequest, match="not a complete cache entry"):
        check_disk(instance_disk(disk_path, backing=str(ctx.cache_dir / ("0" * 40))), ctx)
    with pytest.raises(InvalidRequest, match=r"'\.\.' is not a valid name"):
        check_disk(instance_disk(disk_path, backing=str(ctx.cache_dir / "..")), ctx)
    disk_path.unlink()
    disk_path.symlink_to("/etc/passwd")
    with pytest.raises(InvalidRequest, match="symbolic link"):
        check_disk(instance_disk(disk_path), ctx)


def test_injection_writes_only_into_the_disk_s_own_mount_directory(
    ports: Ports, tmp_path: Path
) -> None:
    ctx = context(ports, tmp_path)
    disk = instance_disk(ctx.instances_dir / "vm" / "disk")
    base = CachedImage(
        key="k", image_id="i", path="/c", format="raw", virtual_size=1, source_sha256=""
    )
    mapped = MappedDisk(
        prepared=PreparedDisk(disk=disk, base=base),
        view=disk.path,
        partition=GuestPartition(table="none", number=None, offset=0, size=1),
        filesystem="ext4",
        method="fuse2fs",
    )
    crafted = MountedDisk(mapped=mapped, mount_dir=str(tmp_path / "host-etc"))
    with pytest.raises(InvalidRequest, match="is not"):
        inject_files(crafted, [FileInjection(path="/x", content="x")], ctx)
    assert not (tmp_path / "host-etc").exists()
