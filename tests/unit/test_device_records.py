"""The resource ledger (on fakeredis), teardown from any recorded state, and when a failing
device step releases the disk: on its final failure, never before a retry."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

from domain.core.device_records import DeviceRecord, LoopDevice, Mount, StorageDaemon, WorkDir
from domain.core.errors import (
    DiskBusy,
    FilesystemRefused,
    InvalidRequest,
    NoFreeDevice,
    SourceUnavailable,
)
from domain.core.models import (
    CachedImage,
    DiskSpec,
    FileInjection,
    ImageSource,
    InstanceDisk,
    PreparedDisk,
    PrepareRequest,
)
from domain.core.runner import Runner
from domain.guest.context import (
    Claim,
    DeviceContext,
    GuestPartition,
    MappedDisk,
    MountedDisk,
    check_disk,
)
from domain.guest.devices import allocate
from domain.guest.injection import inject_files
from domain.guest.mounting import check_ext_fits, mount_method
from domain.guest.teardown import release_devices
from worker.device_context import device_context
from worker.janitor import orphans
from worker.redis_ledger import RedisDeviceLedger
from worker.redis_locks import RedisLockFactory
from worker.runtime import Runtime
from worker.settings import MountSettings, Settings


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def ledger(client: fakeredis.FakeRedis) -> RedisDeviceLedger:
    return RedisDeviceLedger(client, "host-1")


def context(client: fakeredis.FakeRedis, state_dir: Path, owner: str = "op-a") -> DeviceContext:
    return DeviceContext(
        runner=Runner(default_timeout=30),
        ledger=RedisDeviceLedger(client, "host-1"),
        locks=RedisLockFactory(client, lease=5, renew_every=1, wait=1),
        policy=MountSettings(stop_timeout_seconds=2),
        state_dir=state_dir,
        instances_dir=state_dir / "instances",
        cache_dir=state_dir / "cache",
        host="host-1",
        owner=owner,
        worker="w1@h",
    )


def test_one_owner_at_a_time_and_only_the_owner_drops(
    ledger: RedisDeviceLedger, client: fakeredis.FakeRedis
) -> None:
    first = ledger.claim("vm/disk", "op-a", "w1")
    assert ledger.claim("vm/disk", "op-a", "w2").owner == "op-a"  # the same operation again
    with pytest.raises(DiskBusy, match="held by operation op-a"):
        ledger.claim("vm/disk", "op-b", "w1")
    ledger.drop("vm/disk", "op-b")
    assert ledger.get("vm/disk") is not None
    ledger.drop("vm/disk", "op-a")
    assert ledger.get("vm/disk") is None
    assert client.exists("imgprep:devices:host-1") == 0  # no key left once the host is empty
    assert first.resources == ()


def test_claim_notes_resources_in_order_and_updates_in_place(ledger: RedisDeviceLedger) -> None:
    claim = Claim(ledger, ledger.claim("vm/disk", "op-a", "w1"))
    claim.note(WorkDir(path="/s/vm/disk"))
    claim.note(LoopDevice(backing="/s/export", offset=512, size=1024))
    claim.note(LoopDevice(backing="/s/export", offset=512, size=1024, device="/dev/loop3"))
    stored = ledger.get("vm/disk")
    assert stored is not None
    assert [r.kind for r in stored.resources] == ["workdir", "loop"]
    assert (
        isinstance(stored.resources[1], LoopDevice) and stored.resources[1].device == "/dev/loop3"
    )


def test_teardown_from_a_record_whose_resources_are_already_gone(
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    # Given a record naming every kind of resource, none of which exists any more (a crash
    # after the record was written and before, or after, each resource was made)
    ctx = context(client, tmp_path)
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
    assert list(client.scan_iter(match="imgprep:lock:*")) == []


def test_teardown_leaves_another_operations_record_alone(
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    mine = context(client, tmp_path, owner="op-a")
    Claim(mine.ledger, mine.ledger.claim("vm/disk", "op-a", "w1")).note(WorkDir(path="/nowhere"))
    assert release_devices("vm/disk", context(client, tmp_path, owner="op-b")) is False
    assert mine.ledger.get("vm/disk") is not None
    assert (
        release_devices("vm/disk", context(client, tmp_path, owner="op-b"), any_owner=True) is True
    )


class FakeStep:
    """What device_context reads from a Celery task: its retry decision and worker name."""

    def __init__(self, retries_left: bool) -> None:
        self.retries_left = retries_left
        self.request = SimpleNamespace(hostname="w1@h")

    def will_retry(self, error: BaseException) -> bool:
        return self.retries_left and isinstance(error, SourceUnavailable)


def run_failing_step(
    client: fakeredis.FakeRedis, tmp_path: Path, step: FakeStep, error: Exception
) -> DeviceRecord | None:
    settings = Settings(state_dir=tmp_path)
    current = Runtime(
        settings=settings,
        redis=client,
        locks=RedisLockFactory(client, lease=5, renew_every=1, wait=1),
        runner=Runner(default_timeout=30),
    )
    request = PrepareRequest(
        image=ImageSource(url="http://x/y", image_id="y"),
        disk=DiskSpec(instance_id="vm", size_bytes=1),
    )
    ledger = RedisDeviceLedger(client, settings.host_id)

    def step_body() -> None:
        with device_context(step, request, "op-a", current) as ctx:  # type: ignore[arg-type]
            area = ctx.work_area("vm/disk")
            Claim(ledger, ledger.claim("vm/disk", "op-a", "w1")).note(WorkDir(path=str(area.path)))
            raise error

    with pytest.raises(type(error)):
        step_body()
    return ledger.get("vm/disk")


def test_a_step_about_to_retry_keeps_the_disk_s_devices(
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    kept = run_failing_step(client, tmp_path, FakeStep(retries_left=True), SourceUnavailable("x"))
    assert kept is not None and kept.owner == "op-a"


@pytest.mark.parametrize(
    ("retries_left", "error"),
    [(False, SourceUnavailable("no retries left")), (True, FilesystemRefused("permanent"))],
)
def test_a_step_failing_for_good_releases_the_disk_before_the_failure_is_stored(
    client: fakeredis.FakeRedis, tmp_path: Path, retries_left: bool, error: Exception
) -> None:
    assert run_failing_step(client, tmp_path, FakeStep(retries_left), error) is None


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


def test_janitor_takes_records_of_workers_that_do_not_answer() -> None:
    records = [
        DeviceRecord(disk="a/disk", owner="o1", worker="alive@h"),
        DeviceRecord(disk="b/disk", owner="o2", worker="dead@h"),
    ]
    assert [r.disk for r in orphans(records, {"alive@h"})] == ["b/disk"]


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
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    # Given the instance disk where imgprep would have put it
    ctx = context(client, tmp_path)
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
    with pytest.raises(InvalidRequest, match="not a cache key"):
        check_disk(instance_disk(disk_path, backing=str(ctx.cache_dir / "..")), ctx)
    disk_path.unlink()
    disk_path.symlink_to("/etc/passwd")
    with pytest.raises(InvalidRequest, match="symbolic link"):
        check_disk(instance_disk(disk_path), ctx)


def test_injection_writes_only_into_the_disk_s_own_mount_directory(
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    ctx = context(client, tmp_path)
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
