"""The life of a disk's devices on real parts: kernel mounts, a worker killed while a disk is
mounted and the janitor of the next worker, the release errback, and two operations wanting
the same disk. Tests that need other worker settings start their own workers under a host id of
their own, so only they consume that host's queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.core.errors import DiskBusy
from domain.core.models import PreparedDisk
from domain.core.runner import Runner
from domain.guest.tools import daemons, losetup
from tests.integration.conftest import Cluster, ClusterFactory, unique
from tests.integration.devices import (
    MOTD,
    assert_released,
    device_records,
    device_steps,
    direct_disk,
    is_mounted,
    mount_dir,
    need_devices,
    send,
)
from tests.support.guests import read_guest_file
from tests.support.waiting import wait_for
from worker.app.runtime import lock_factory
from worker.cli.demo.ports import free_port
from worker.cli.demo.worker_processes import WorkerProcess


@pytest.fixture(autouse=True)
def _needs_devices() -> None:
    need_devices()


@pytest.fixture
def own_host(clean_cluster: Cluster) -> Iterator[tuple[str, list[WorkerProcess]]]:
    """A host id of the test's own; the workers the test starts for it are stopped after."""
    started: list[WorkerProcess] = []
    yield unique("host"), started
    for worker in started:
        worker.stop()


def host_worker(cluster: Cluster, host: str, kernel_mount: str = "never") -> WorkerProcess:
    return cluster.start_worker(
        "devices",
        env={"IMGPREP_HOST_ID": host, "IMGPREP_MOUNT__KERNEL_MOUNT": kernel_mount},
        concurrency=1,
    )


def storage_daemons(cluster: Cluster, key: str) -> list[int]:
    export = cluster.settings.devices_dir / key / "export"
    return daemons.find("qemu-storage-daemon", export)


def test_kernel_mount_of_a_qcow2_overlay_through_a_loop_device(
    clean_cluster: Cluster, own_host: tuple[str, list[WorkerProcess]]
) -> None:
    # Given a worker whose settings mount every guest filesystem with the kernel
    host, started = own_host
    started.append(host_worker(clean_cluster, host, kernel_mount="always"))
    disk = direct_disk(clean_cluster, "qcow2", layout="mbr-logical", host=host)

    # When the device steps run on its host's queue
    operation = unique("op")
    result = send(clean_cluster, device_steps(disk, operation, host=host), operation)
    done = PreparedDisk.model_validate(result.get(timeout=60))

    # Then the guest was mounted by the kernel (from a loop device over the storage daemon's
    # export) and the file is in the overlay, not in the base
    assert done.guest is not None
    assert (done.guest.mount, done.guest.partition) == ("kernel", 5)
    overlay = Path(disk.prepared.disk.path)
    found = read_guest_file(overlay, "qcow2", disk.offset, "/etc/motd")
    assert found is not None and (found.content, found.mode) == (MOTD.data(), MOTD.mode)
    base = Path(disk.prepared.disk.backing_file or "")
    assert read_guest_file(base, "raw", disk.offset, "/etc/motd") is None
    disk.remove()
    assert_released(clean_cluster, disk.request.disk.instance_id)


@pytest.mark.parametrize(
    ("fmt", "kernel_mount"),
    [("raw", "never"), ("qcow2", "always")],
    ids=["raw-fuse2fs", "qcow2-storage-daemon-loop-kernel-mount"],
)
def test_janitor_of_a_new_worker_releases_what_a_killed_worker_left_mounted(
    clean_cluster: Cluster,
    own_host: tuple[str, list[WorkerProcess]],
    fmt: str,
    kernel_mount: str,
) -> None:
    # Given a worker that mapped and mounted a disk (no teardown yet)
    host, started = own_host
    first = host_worker(clean_cluster, host, kernel_mount)
    started.append(first)
    disk = direct_disk(clean_cluster, fmt, host=host)
    operation = unique("op")
    steps = device_steps(disk, operation, host=host, upto="imgprep.mount_guest")
    send(clean_cluster, steps, operation).get(timeout=60)
    target = mount_dir(clean_cluster, disk.key)
    assert is_mounted(target)
    view = Path(disk.prepared.disk.path) if fmt == "raw" else target.parent / "export"
    loops = losetup.backed_by(Runner(), view)
    assert bool(loops) == (kernel_mount == "always")
    assert bool(storage_daemons(clean_cluster, disk.key)) == (fmt == "qcow2")

    # When that worker is killed with SIGKILL: its mount, devices and daemons outlive it
    first.kill()
    assert is_mounted(target)
    assert disk.key.encode() in next(iter(device_records(clean_cluster).values()))

    # and another worker starts on the same host
    started.append(host_worker(clean_cluster, host, kernel_mount))

    # Then its janitor released everything before the worker took its first task
    assert not is_mounted(target)
    assert losetup.backed_by(Runner(), view) == []
    assert storage_daemons(clean_cluster, disk.key) == []
    disk.remove()
    assert_released(clean_cluster, disk.request.disk.instance_id)


def test_release_errback_releases_only_what_its_operation_holds(clean_cluster: Cluster) -> None:
    # Given a disk mapped and mounted by operation A
    host = clean_cluster.settings.host_id
    disk = direct_disk(clean_cluster, "qcow2")
    operation = unique("op")
    send(
        clean_cluster,
        device_steps(disk, operation, host=host, upto="imgprep.mount_guest"),
        operation,
    ).get(timeout=60)
    target = mount_dir(clean_cluster, disk.key)
    release = disk.request.model_copy(update={"inject": ()}).model_dump(mode="json")

    # When the release errback runs for another operation on the same disk
    other = clean_cluster.app.send_task(
        "imgprep.release_devices", args=[release, unique("op")], queue=f"imgprep.host.{host}"
    )

    # Then it releases nothing
    assert other.get(timeout=30) is False
    assert is_mounted(target)

    # And when it runs for operation A, everything is released
    mine = clean_cluster.app.send_task(
        "imgprep.release_devices", args=[release, operation], queue=f"imgprep.host.{host}"
    )
    assert mine.get(timeout=30) is True
    assert not is_mounted(target)
    disk.remove()
    assert_released(clean_cluster, disk.request.disk.instance_id)


def test_second_operation_on_a_mounted_disk_fails_busy_and_leaves_the_first_alone(
    clean_cluster: Cluster,
) -> None:
    # Given a disk that operation A has mounted
    host = clean_cluster.settings.host_id
    disk = direct_disk(clean_cluster, "raw")
    first = unique("op")
    send(
        clean_cluster, device_steps(disk, first, host=host, upto="imgprep.mount_guest"), first
    ).get(timeout=60)
    target = mount_dir(clean_cluster, disk.key)

    # When operation B runs all device steps on the same disk
    second = unique("op")
    result = send(clean_cluster, device_steps(disk, second, host=host), second)

    # Then B retries while the disk is busy and fails with DiskBusy naming A
    with pytest.raises(DiskBusy, match=first):
        result.get(timeout=120)
    # and B's failure released none of A's devices
    assert is_mounted(target)
    records = next(iter(device_records(clean_cluster).values()))
    assert first.encode() in records[disk.key.encode()]
    release = disk.request.model_copy(update={"inject": ()}).model_dump(mode="json")
    clean_cluster.app.send_task(
        "imgprep.release_devices", args=[release, first], queue=f"imgprep.host.{host}"
    ).get(timeout=30)
    disk.remove()
    assert_released(clean_cluster, disk.request.disk.instance_id)


def test_janitor_in_host_scope_waits_for_the_lock_the_steps_take_on_the_disk(
    cluster_factory: ClusterFactory,
) -> None:
    # Given a cluster in host scope, where the steps' locks are named in the host's namespace
    host = unique("hj")
    scoped = cluster_factory(
        "hostjanitor",
        {
            "IMGPREP_HOST_ID": host,
            "IMGPREP_IMAGE_CACHE__SCOPE": "host",
            "IMGPREP_PEER__SECRET": unique("secret"),
            "IMGPREP_PEER__ADDRESS": "127.0.0.1",
            "IMGPREP_PEER__PORT": str(free_port()),
        },
    )
    assert scoped.settings.cache_namespace == f"{host}/"
    # and a worker killed while it had a disk mounted
    first = scoped.add_worker("first", concurrency=1)
    disk = direct_disk(scoped, "raw")
    operation = unique("op")
    steps = device_steps(disk, operation, host=host, upto="imgprep.mount_guest")
    send(scoped, steps, operation).get(timeout=60)
    target = mount_dir(scoped, disk.key)
    first.kill()
    assert is_mounted(target)

    # When a step holds the disk's lock (its own name, in the host's namespace) while another
    # worker of the host starts
    step_lock = lock_factory(scoped.redis, scoped.settings, wait=0)(f"devices:{host}:{disk.key}")
    with step_lock:
        second = scoped.add_worker("second", concurrency=1)

        # Then its janitor leaves the disk to the lock's holder: skipped, still mounted
        outcome = wait_for(
            lambda: janitor_outcome(second),
            timeout=120,
            what="the janitor to skip or release the dead worker's disk",
        )
        assert outcome == "orphan_skipped"
        assert is_mounted(target)
        assert disk.key.encode() in next(iter(device_records(scoped).values()))

    # And once the lock is free, the next worker's janitor releases the dead worker's devices
    second.stop()
    scoped.add_worker("third", concurrency=1)
    assert not is_mounted(target)
    disk.remove()
    assert_released(scoped, disk.request.disk.instance_id)
    scoped.assert_clean()


def janitor_outcome(worker: WorkerProcess) -> str | None:
    """What the worker's janitor did with an orphaned disk, from its log."""
    log = worker.log_path.read_text(errors="replace")
    for event in ("orphan_skipped", "orphaned_devices_released", "orphan_release_failed"):
        if f'"event": "{event}"' in log:
            return event
    return None
