"""File injection into rbd disks on real parts: the clone exported by qemu-storage-daemon's rbd
driver over FUSE (as the workers' user, with their Ceph key), its partition table read, the
guest filesystem mounted by fuse2fs, the files written, everything released; the image's
protected snapshot read back unchanged."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from domain.core.errors import DeviceError
from domain.rbd import names
from tests.integration.ceph import assert_rbd_clean
from tests.integration.conftest import Cluster, unique
from tests.integration.devices import (
    MOTD,
    DirectDisk,
    assert_released,
    device_steps,
    need_devices,
    send,
)
from tests.integration.test_injection import KEY, injecting, serve_guest
from tests.support.guests import fsck_clean, read_guest_file
from worker.cli.demo.ceph_cluster import CephCluster
from worker.cli.demo.image_server import ImageServer


@pytest.fixture(autouse=True)
def _needs_devices() -> None:
    need_devices()


def exported(ceph: CephCluster, spec: str, into: Path) -> Path:
    """The RBD image (or snapshot) `spec` as a local raw file (rbd export, as the admin)."""
    subprocess.run(
        ["rbd", *ceph.admin_args(), "export", "--no-progress", spec, str(into)],
        check=True,
        capture_output=True,
    )
    return into


@pytest.mark.parametrize("layout", ["mbr", "gpt"])
def test_injection_into_an_rbd_disk_writes_only_into_the_clone(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer, tmp_path: Path, layout: str
) -> None:
    # Given a raw guest image with this layout, served over HTTP
    name, offset = serve_guest(image_server, layout)
    source_digest = hashlib.sha256((image_server.root / name).read_bytes()).hexdigest()
    request = injecting(image_server, name, [MOTD, KEY], backend="rbd", host="rbd-b")

    # When an rbd disk is prepared from it with two files to inject
    prepared = clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(request), timeout=180)

    # Then the result names the files and the mount, and the clone holds them
    assert [f.path for f in prepared.injected] == ["/etc/motd", "/root/.ssh/authorized_keys"]
    assert prepared.guest is not None and prepared.guest.mount == "fuse2fs"
    disk = names.disk_image(request.disk.instance_id, "disk")
    clone = exported(ceph, f"vms/{disk}", tmp_path / "clone.raw")
    for item in (MOTD, KEY):
        found = read_guest_file(clone, "raw", offset, item.path)
        assert found is not None, item.path
        assert (found.content, found.mode, found.uid) == (item.data(), item.mode, 0)
    assert fsck_clean(clone, "raw", offset)
    # and the image's protected snapshot is byte for byte the source: nothing was written there
    key = names.image_name(request.image.image_id)
    parent = exported(ceph, f"images/{key}@snap", tmp_path / "parent.raw")
    assert hashlib.sha256(parent.read_bytes()).hexdigest() == source_digest
    assert read_guest_file(parent, "raw", offset, "/etc/motd") is None
    # and the export, mount, daemon and work area are gone
    assert_released(clean_rbd, request.disk.instance_id)
    clean_rbd.client.send(
        "imgprep.delete_disk",
        {"instance_id": request.disk.instance_id, "backend": "rbd", "host": "rbd-b"},
    ).get(timeout=60)
    assert_rbd_clean(clean_rbd, ceph)


def test_an_rbd_disk_gone_before_injection_fails_typed_and_releases_everything(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given a prepared rbd disk, removed behind imgprep's back before its files are injected
    name, offset = serve_guest(image_server, "mbr")
    request = injecting(image_server, name, [MOTD], backend="rbd", host="rbd-a")
    plain = request.model_copy(update={"inject": ()})
    prepared = clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(plain), timeout=180)
    ceph.rbd("rm", prepared.disk.path.removeprefix("rbd:"))

    # When the injection steps run on it
    operation = unique("op")
    result = send(
        clean_rbd,
        device_steps(DirectDisk(prepared, request, offset), operation, host="rbd-a"),
        operation,
    )

    # Then the export fails with a DeviceError naming the disk, and nothing is left: no
    # export, mount, daemon, work area or record
    with pytest.raises(DeviceError, match="rbd"):
        result.get(timeout=120)
    assert_released(clean_rbd, request.disk.instance_id)
    assert_rbd_clean(clean_rbd, ceph)
