"""The rbd backend on real parts: a Ceph cluster the session starts (cephx on), real workers on
two host ids, real downloads, imports, clones, snapshots and removals."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from domain.core.errors import ChecksumMismatch, DiskConflict, DiskTooSmall, RbdSourceRefused
from domain.core.models import DeleteDiskRequest, DiskSpec, ImageSource, PrepareRequest
from domain.rbd import names
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from worker.cli.demo.ceph_cluster import CephCluster
from worker.cli.demo.image_server import ImageServer

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
    """Bytes of an RBD image (or snapshot) as a guest sees them (`rbd export`, as the admin)."""
    out = subprocess.run(
        ["rbd", *ceph.admin_args(), "export", "--no-progress", spec, "-"],
        capture_output=True,
        check=True,
    )
    return out.stdout[offset : offset + length]


def write_rbd(ceph: CephCluster, spec: str, data: bytes, offset: int) -> None:
    """Write `data` into an RBD image at `offset`, as a guest would (through qemu)."""
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "data"
        source.write_bytes(data)
        subprocess.run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                f"write -P 0xa5 {offset} {len(data)}",
                f"rbd:{spec}:conf={ceph.directory / 'ceph.conf'}",
            ],
            capture_output=True,
            check=True,
            env={"CEPH_ARGS": " ".join(ceph.admin_args()), "PATH": "/usr/bin:/bin"},
        )


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


def imports_logged(cluster: Cluster, key: str) -> int:
    """How many times the workers' logs say they imported the image `key` into the cluster."""
    count = 0
    for log in (cluster.root / "logs").glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"rbd_image_imported"' in line and key in line:
                count += 1
    return count


def test_a_burst_across_hosts_downloads_once_and_imports_once(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given a new image, and 8 prepares of it at once on two hosts of one cluster
    name = served_image(image_server, size=64 * MiB)
    image_id = unique("img")
    requests = [
        rbd_request(image_server, name, image_id=image_id, host=("rbd-a", "rbd-b")[i % 2])
        for i in range(8)
    ]
    # When they are sent together
    results = [clean_rbd.client.prepare_disk(request) for request in requests]
    prepared = [clean_rbd.client.wait_prepared(result, timeout=180) for result in results]

    # Then every disk is a clone of the one imported image: one download, one import
    key = names.image_name(image_id)
    assert {p.disk.backing_file for p in prepared} == {f"rbd://{ceph.fsid}/images/{key}/snap"}
    assert image_server.gets(name) == 1
    assert imports_logged(clean_rbd, key) == 1
    children = ceph.rbd_json("children", f"images/{key}@snap")
    assert isinstance(children, list) and len(children) == 8
    for request in requests:
        ceph.rbd("rm", f"vms/{names.disk_image(request.disk.instance_id, 'disk')}")


def test_an_rbd_source_of_this_cluster_is_cloned_without_a_download(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given an image Glance put in the cluster: a raw image with a protected snapshot
    source = unique("glance")
    ceph.rbd("create", "--size", "32M", f"images/{source}")
    ceph.rbd("snap", "create", f"images/{source}@snap")
    ceph.rbd("snap", "protect", f"images/{source}@snap")
    location = f"rbd://{ceph.fsid}/images/{source}/snap"
    request = PrepareRequest(
        image=ImageSource(url=location, image_id=unique("img")),
        disk=DiskSpec(instance_id=unique("vm"), size_bytes=64 * MiB, backend="rbd"),
        host="rbd-b",
    )
    # When a disk is prepared from its location, Then it is a clone of that snapshot
    prepared = clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(request), timeout=120)
    assert prepared.disk.backing_file == location
    image = names.disk_image(request.disk.instance_id, "disk")
    info = ceph.rbd_json("info", f"vms/{image}")
    assert isinstance(info, dict) and info["parent"]["image"] == source
    # and nothing was imported for it
    assert names.image_name(request.image.image_id) not in ceph.images("images")

    # A location in another cluster, or of a snapshot holding a qcow2, is refused
    elsewhere = request.model_copy(
        update={
            "image": ImageSource(
                url=location.replace(ceph.fsid, str(uuid.uuid4())), image_id=unique("img")
            ),
            "disk": request.disk.model_copy(update={"instance_id": unique("vm")}),
        }
    )
    with pytest.raises(RbdSourceRefused, match="cluster"):
        clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(elsewhere), timeout=120)
    qcow2 = unique("glance")
    with tempfile.TemporaryDirectory() as scratch:
        made = Path(scratch) / "q.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(made), "32M"], check=True)
        ceph.rbd("import", str(made), f"images/{qcow2}")
    ceph.rbd("snap", "create", f"images/{qcow2}@snap")
    ceph.rbd("snap", "protect", f"images/{qcow2}@snap")
    hidden = request.model_copy(
        update={
            "image": ImageSource(
                url=f"rbd://{ceph.fsid}/images/{qcow2}/snap", image_id=unique("img")
            ),
            "disk": request.disk.model_copy(update={"instance_id": unique("vm")}),
        }
    )
    with pytest.raises(RbdSourceRefused, match="not raw"):
        clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(hidden), timeout=120)
    # cleanup: the clone, then the sources
    ceph.rbd("rm", f"vms/{image}")
    for made_image in (source, qcow2):
        ceph.rbd("snap", "unprotect", f"images/{made_image}@snap")
        ceph.rbd("snap", "purge", f"images/{made_image}")
        ceph.rbd("rm", f"images/{made_image}")


def test_direct_snapshot_and_extract(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given an rbd disk whose guest wrote into it
    request = rbd_request(image_server, served_image(image_server), size=32 * MiB)
    clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(request), timeout=120)
    disk = names.disk_image(request.disk.instance_id, "disk")
    write_rbd(ceph, f"vms/{disk}", b"\xa5" * MiB, offset=2 * MiB)

    # When it is snapshotted directly (Nova's direct_snapshot)
    snapshot_id = unique("snapimg")
    direct = clean_rbd.client.send(
        "imgprep.snapshot",
        {
            "instance_id": request.disk.instance_id,
            "backend": "rbd",
            "method": "direct",
            "image_id": snapshot_id,
            "host": "rbd-a",
        },
    ).get(timeout=120)
    # Then the new image is flattened into the images pool with a protected snapshot, and
    # holds what the guest wrote; the disk keeps no snapshot
    key = names.image_name(snapshot_id)
    assert direct["location"] == f"rbd://{ceph.fsid}/images/{key}/snap"
    info = ceph.rbd_json("info", f"images/{key}")
    assert isinstance(info, dict) and "parent" not in info
    assert [s["protected"] for s in ceph.snapshots("images", key)] == ["true"]
    assert read_rbd(ceph, f"images/{key}@snap", MiB, offset=2 * MiB) == b"\xa5" * MiB
    assert ceph.snapshots("vms", disk) == []
    # and it is idempotent
    again = clean_rbd.client.send(
        "imgprep.snapshot",
        {
            "instance_id": request.disk.instance_id,
            "backend": "rbd",
            "method": "direct",
            "image_id": snapshot_id,
            "host": "rbd-a",
        },
    ).get(timeout=120)
    assert again == direct

    # When it is extracted to a file (the standard snapshot)
    extracted = clean_rbd.client.send(
        "imgprep.snapshot",
        {
            "instance_id": request.disk.instance_id,
            "backend": "rbd",
            "target": f"{disk}.qcow2",
            "host": "rbd-a",
        },
    ).get(timeout=120)
    # Then the file is a qcow2 with the disk's bytes
    target = Path(extracted["path"])
    assert extracted["source"] == f"rbd:vms/{disk}" and extracted["format"] == "qcow2"
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(target), str(raw)], check=True
        )
        data = raw.read_bytes()
    assert data[2 * MiB : 3 * MiB] == b"\xa5" * MiB and data[:MiB] == b"\x5a" * MiB
    target.unlink()
    target.with_name(target.name + ".json").unlink()

    # A prepare of the snapshot's image id clones it, with no download
    from_snapshot = PrepareRequest(
        image=ImageSource(url=image_server.url("never-served.raw"), image_id=snapshot_id),
        disk=DiskSpec(instance_id=unique("vm"), size_bytes=32 * MiB, backend="rbd"),
        host="rbd-b",
    )
    booted = clean_rbd.client.wait_prepared(
        clean_rbd.client.prepare_disk(from_snapshot), timeout=120
    )
    assert booted.disk.backing_file == direct["location"]
    assert image_server.gets("never-served.raw") == 0
    for request_disk in (disk, names.disk_image(from_snapshot.disk.instance_id, "disk")):
        clean_rbd.client.send(
            "imgprep.delete_disk",
            {"instance_id": request_disk.rsplit("_", 1)[0], "backend": "rbd", "host": "rbd-a"},
        ).get(timeout=60)


def test_delete_and_aging_never_remove_a_parent_with_clones(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given two imported images, one with a clone
    used = rbd_request(image_server, served_image(image_server))
    unused = rbd_request(image_server, served_image(image_server))
    for request in (used, unused):
        clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(request), timeout=120)
    delete = {"instance_id": unused.disk.instance_id, "backend": "rbd", "host": "rbd-a"}
    assert clean_rbd.client.send("imgprep.delete_disk", delete).get(timeout=60)["existed"]
    # deleting it again succeeds and says it was not there
    assert not clean_rbd.client.send("imgprep.delete_disk", delete).get(timeout=60)["existed"]

    # When the images pool is aged with a window of 0 s
    report = clean_rbd.client.send(
        "imgprep.evict_cache",
        {"backend": "rbd", "remove_unused_original_minimum_age_seconds": 0},
    ).get(timeout=120)
    # Then the image without clones is gone, the one with a clone stays, with its clone
    used_key, unused_key = (names.image_name(r.image.image_id) for r in (used, unused))
    assert unused_key in [item["key"] for item in report["evicted"]]
    assert used_key in report["kept_in_use"]
    assert unused_key not in ceph.images("images")
    assert used_key in ceph.images("images")
    # and with the default window (a day), nothing unused this recently goes
    delete_used = {"instance_id": used.disk.instance_id, "backend": "rbd", "host": "rbd-b"}
    clean_rbd.client.send("imgprep.delete_disk", delete_used).get(timeout=60)
    report = clean_rbd.client.send("imgprep.evict_cache", {"backend": "rbd"}).get(timeout=120)
    assert used_key in ceph.images("images")
    assert used_key not in [item["key"] for item in report["evicted"]]


def test_the_cli_prepares_snapshots_and_shows_the_rbd_steps(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given a served image
    name = served_image(image_server)
    instance = unique("vm")
    # When a user prepares an rbd disk and waits for it
    done = clean_rbd.cli(
        "prepare", image_server.url(name), "--image-id", unique("img"), "--instance", instance,
        "--size", "64M", "--backend", "rbd", "--host", "rbd-a", "--wait", "--json",
    )  # fmt: skip
    # Then the result names the clone and its parent's location
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["disk"]["path"] == f"rbd:vms/{instance}_disk"
    assert result["base"]["path"].startswith(f"rbd://{ceph.fsid}/images/")
    # and status shows the import and the clone
    view = json.loads(clean_rbd.cli("status", result["task_id"], "--json").stdout)
    assert [s["name"] for s in view["steps"]] == ["import_to_rbd", "clone_rbd_disk"]
    assert view["state"] == "SUCCESS"
    # When the user snapshots it directly, Then the new image's location is printed
    snapshot_id = unique("img")
    made = clean_rbd.cli(
        "snapshot", instance, "--backend", "rbd", "--direct", "--image-id", snapshot_id,
        "--host", "rbd-a", "--wait", "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    location = json.loads(made.stdout)["location"]
    assert location == f"rbd://{ceph.fsid}/images/{names.image_name(snapshot_id)}/snap"
    clean_rbd.client.send(
        "imgprep.delete_disk", {"instance_id": instance, "backend": "rbd", "host": "rbd-a"}
    ).get(timeout=60)


def test_an_image_removed_behind_imgprep_is_imported_again(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given an imported image, removed from the cluster by an operator (its record in Redis,
    # which lets prepares skip asking the cluster, outlives it)
    name = served_image(image_server)
    first = rbd_request(image_server, name)
    clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(first), timeout=120)
    ceph.rbd("rm", f"vms/{names.disk_image(first.disk.instance_id, 'disk')}")
    key = names.image_name(first.image.image_id)
    ceph.rbd("snap", "unprotect", f"images/{key}@snap")
    ceph.rbd("snap", "purge", f"images/{key}")
    ceph.rbd("rm", f"images/{key}")

    # When another disk of that image is prepared
    second = rbd_request(image_server, name, image_id=first.image.image_id)
    prepared = clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(second), timeout=120)

    # Then the clone step imports it again (a second download) and clones it
    assert [s["protected"] for s in ceph.snapshots("images", key)] == ["true"]
    assert prepared.disk.backing_file == f"rbd://{ceph.fsid}/images/{key}/snap"
    assert image_server.gets(name) == 2
    ceph.rbd("rm", f"vms/{names.disk_image(second.disk.instance_id, 'disk')}")


def test_the_demo_shows_the_rbd_path_on_a_throwaway_cluster(clean_rbd: Cluster) -> None:
    # When a user runs the demo on the rbd backend
    done = clean_rbd.cli("demo", "--backend", "rbd", timeout=300)
    # Then it starts a cluster, prepares two clones of one imported image with a file injected
    # into each, reads the file back from each clone, and stops the cluster
    assert done.returncode == 0, done.stdout + done.stderr
    assert "prepared    2 of 2 disks" in done.stdout
    assert done.stdout.count("rbd:vms/demo-") == 2
    assert "imported    1 image in the pool images" in done.stdout
    assert done.stdout.count("from the disk itself") == 2
    (started,) = [line for line in done.stdout.splitlines() if line.startswith("ceph cluster")][:1]
    fsid = started.split()[2]
    assert f"ceph cluster {fsid} stopped" in done.stdout
    assert not list((clean_rbd.settings.state_dir / "demo").glob("ceph-*"))


def test_a_record_forged_in_redis_never_passes_another_images_checksum(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given an image imported from some bytes, and another version of it (same image id)
    first_name = served_image(image_server, fill=b"\x11")
    first = rbd_request(image_server, first_name)
    clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(first), timeout=120)
    second_name = served_image(image_server, fill=b"\x22")
    wanted = "sha256:" + hashlib.sha256((image_server.root / second_name).read_bytes()).hexdigest()
    # and its record in Redis rewritten, by someone who can write to Redis, to claim the
    # imported bytes are the second version's
    key = names.image_name(first.image.image_id)
    resource = f"{ceph.fsid}/images/{key}"
    forged = json.loads(clean_rbd.redis.hget("imgprep:rbd:images", resource) or "{}")
    assert forged, "the import's record is in Redis"
    forged["source_sha256"] = wanted.removeprefix("sha256:")
    clean_rbd.redis.hset("imgprep:rbd:images", resource, json.dumps(forged, sort_keys=True))

    # When a disk of the second version is asked for, with its checksum
    request = rbd_request(image_server, second_name, image_id=first.image.image_id, checksum=wanted)

    # Then the imported image is not taken for it: the checksum is checked against the
    # image's own record in the cluster, and it names other bytes
    with pytest.raises(ChecksumMismatch):
        clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(request), timeout=120)
    assert names.disk_image(request.disk.instance_id, "disk") not in ceph.images("vms")
    ceph.rbd("rm", f"vms/{names.disk_image(first.disk.instance_id, 'disk')}")
