"""The rbd backend on real parts: a Ceph cluster the session starts (cephx on), real workers on
two host ids, real downloads, imports, clones, snapshots and removals."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from domain.core.errors import ChecksumMismatch, DiskConflict, DiskTooSmall
from domain.core.models import DeleteDiskRequest, DiskSpec, ImageSource, PrepareRequest
from domain.rbd import names
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from worker.harness.ceph_cluster import CephCluster
from worker.harness.image_server import ImageServer

MiB = 2**20


def served_image(image_server: ImageServer, *, size: int = 16 * MiB, fill: bytes = b"\x5a") -> str:
    name = unique("base") + ".raw"
    write_raw_image(image_server.root / name, size=size, data=fill * MiB)
    return name


def rbd_request(
    image_server: ImageServer,
    name: str,
    *,
    image_id: str | None = None,
    instance: str | None = None,
    host: str = "rbd-a",
    size: int = 64 * MiB,
    checksum: str | None = None,
) -> PrepareRequest:
    return PrepareRequest(
        image=ImageSource(
            url=image_server.url(name), image_id=image_id or unique("img"), checksum=checksum
        ),
        disk=DiskSpec(instance_id=instance or unique("vm"), size_bytes=size, backend="rbd"),
        host=host,
    )


def read_rbd(ceph: CephCluster, spec: str, length: int, offset: int = 0) -> bytes:
    """Bytes of an RBD image (or snapshot) as a guest sees them, read back through qemu."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "read"
        subprocess.run(
            [
                "qemu-img",
                "dd",
                "-f",
                "raw",
                "-O",
                "raw",
                f"bs={length}",
                "count=1",
                f"skip={offset // length}",
                f"if=rbd:{spec}:conf={ceph.directory / 'ceph.conf'}",
                f"of={out}",
            ],
            capture_output=True,
            check=True,
            env={"CEPH_ARGS": " ".join(ceph.admin_args()), "PATH": "/usr/bin:/bin"},
        )
        return out.read_bytes()[:length]


def test_a_prepare_clones_the_imported_image_and_grows_it(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given a raw image of 16 MiB served over HTTP
    request = rbd_request(image_server, served_image(image_server), size=64 * MiB)

    # When a 64 MiB rbd disk is prepared from it
    prepared = clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(request), timeout=120)

    # Then the disk is the clone <instance>_disk in the pool vms, of 64 MiB
    image = names.disk_image(request.disk.instance_id, "disk")
    assert prepared.disk.path == f"rbd:vms/{image}"
    assert (prepared.disk.backend, prepared.disk.format) == ("rbd", "raw")
    info = ceph.rbd_json("info", f"vms/{image}")
    assert isinstance(info, dict)
    assert info["size"] == 64 * MiB
    # its parent is the image imported once into the pool images, with a protected snapshot
    key = names.image_name(request.image.image_id)
    assert info["parent"]["pool"] == "images" and info["parent"]["image"] == key
    assert info["parent"]["snapshot"] == "snap"
    assert [s["protected"] for s in ceph.snapshots("images", key)] == ["true"]
    assert prepared.base.path == f"rbd://{ceph.fsid}/images/{key}/snap"
    assert prepared.disk.backing_file == prepared.base.path
    # and a guest reads the image's bytes through the clone
    assert read_rbd(ceph, f"vms/{image}", MiB) == b"\x5a" * MiB

    # When the same request is sent again, Then it is the same disk (no second clone)
    again = clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(request), timeout=120)
    assert again.disk == prepared.disk

    # When the disk is deleted, Then its clone is gone and the image stays
    deleted = clean_rbd.client.send(
        "imgprep.delete_disk",
        DeleteDiskRequest(
            instance_id=request.disk.instance_id, backend="rbd", host="rbd-a"
        ).model_dump(mode="json"),
    ).get(timeout=60)
    assert deleted["existed"] is True
    assert image not in ceph.images("vms")
    assert key in ceph.images("images")


def test_refusals_are_typed_and_leave_nothing(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    name = served_image(image_server, size=32 * MiB)
    # A disk smaller than its image is refused, and no clone is made
    small = rbd_request(image_server, name, size=16 * MiB)
    with pytest.raises(DiskTooSmall):
        clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(small), timeout=120)
    assert names.disk_image(small.disk.instance_id, "disk") not in ceph.images("vms")
    # A checksum that does not match the bytes is refused, and nothing is imported
    bad = rbd_request(image_server, name, checksum="sha256:" + "0" * 64)
    with pytest.raises(ChecksumMismatch):
        clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(bad), timeout=120)
    assert names.image_name(bad.image.image_id) not in ceph.images("images")
    # The same disk asked for again with another size is a conflict, the disk left as it was
    first = rbd_request(image_server, name, size=64 * MiB)
    clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(first), timeout=120)
    other = first.model_copy(
        update={"disk": first.disk.model_copy(update={"size_bytes": 96 * MiB})}
    )
    with pytest.raises(DiskConflict):
        clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(other), timeout=120)
    image = names.disk_image(first.disk.instance_id, "disk")
    info = ceph.rbd_json("info", f"vms/{image}")
    assert isinstance(info, dict) and info["size"] == 64 * MiB
    ceph.rbd("rm", f"vms/{image}")


def test_cluster_json_is_what_the_tests_read(ceph: CephCluster) -> None:
    assert json.loads(ceph.ceph("fsid", "--format", "json"))["fsid"] == ceph.fsid
    assert Path(ceph.conf).is_file()
