"""The checker over the Ceph cluster's final state (campaigns with --rbd):

* no temporary (`<name>.part.<fence>`) is left in the pools, and no record of one in Redis;
* every image in the images pool that imgprep made has its protected snapshot `snap`, and an
  imported one holds its source's raw conversion (sha256 of `rbd export` of the snapshot against
  a fresh `qemu-img convert`);
* every rbd disk the client knows to exist is there, a clone of its image's snapshot (or a
  flattened copy's: never without its data) of the size it was made with, and holds its injected
  files; every rbd disk whose delete succeeded, or whose request had to fail, is not.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import redis

from bench.chaos.catalogue import sha256_file
from bench.chaos.checker import Violation, World
from bench.chaos.workload import Disk
from domain.rbd import names
from worker.cli.demo.ceph_cluster import CephCluster
from worker.cli.demo.guest_files import read_guest_file

POOLS = ("vms", "images")
INJECTED_SAMPLE = 6


def check_rbd_state(
    world: World, disks: list[Disk], ceph: CephCluster, client: redis.Redis, scratch: Path
) -> list[Violation]:
    found = [
        Violation("no-temporary", f"temporary {pool}/{name} is left in the cluster")
        for pool in POOLS
        for name in ceph.images(pool)
        if names.is_temporary(name)
    ]
    found += [
        Violation("no-temporary", f"Redis still records temporaries: {key!r}")
        for key in client.scan_iter(match="imgprep:temporaries:*")
    ]
    with tempfile.TemporaryDirectory(dir=scratch) as work:
        found += _check_images(world, ceph, Path(work))
        found += _check_disks(disks, ceph, Path(work))
    return found


def _check_images(world: World, ceph: CephCluster, work: Path) -> list[Violation]:
    by_key = {image.key: image for image in world.catalogue.values()}
    found = []
    for name in ceph.images("images"):
        if names.is_temporary(name):
            continue
        record = ceph.rbd("image-meta", "get", f"images/{name}", "imgprep.record", check=False)
        if not record:
            continue  # not imgprep's
        snapshots = ceph.snapshots("images", name)
        if not any(s["name"] == "snap" and s["protected"] == "true" for s in snapshots):
            found.append(Violation("rbd-image", f"images/{name} has no protected snapshot snap"))
            continue
        image = by_key.get(name)
        if image is None or json.loads(record).get("image_id") != image.image_id:
            continue  # a direct snapshot: its bytes are the disk's, checked by its clones
        exported = work / f"{name}.raw"
        ceph.rbd("export", "--no-progress", f"images/{name}@snap", str(exported))
        digest = sha256_file(exported)
        exported.unlink()
        if digest != image.cached_sha256:
            found.append(
                Violation(
                    "rbd-image",
                    f"images/{name} ({image.name}) has sha256 {digest}; a fresh raw conversion "
                    f"of the source has {image.cached_sha256}",
                )
            )
    return found


def _check_disks(disks: list[Disk], ceph: CephCluster, work: Path) -> list[Violation]:
    present = set(ceph.images("vms"))
    found = []
    sampled = 0
    for disk in disks:
        if disk.backend != "rbd":
            continue
        image = names.disk_image(disk.instance_id, disk.disk_name)
        if disk.state == "absent" and image in present:
            found.append(
                Violation("deleted-disk-gone", f"{disk.name} exists although its delete succeeded")
            )
        if disk.state != "present" or disk.prepared is None:
            continue
        if image not in present:
            found.append(
                Violation(
                    "prepared-disk-exists",
                    f"{disk.name} (vms/{image}), made by a successful prepare and never deleted, "
                    "is gone",
                )
            )
            continue
        info = ceph.rbd_json("info", f"vms/{image}")
        assert isinstance(info, dict)
        if info.get("size") != disk.size:
            found.append(
                Violation(
                    "prepared-disk-exists",
                    f"{disk.name} has {info.get('size')} bytes, not {disk.size}",
                )
            )
        parent = info.get("parent") or {}
        wanted = disk.prepared["disk"]["backing_file"].rsplit("/", 3)[1:]
        if [parent.get("pool"), parent.get("image"), parent.get("snapshot")] != wanted:
            found.append(
                Violation(
                    "backing-file", f"{disk.name} is a clone of {parent}, prepared on {wanted}"
                )
            )
        if disk.injected and sampled < INJECTED_SAMPLE:
            sampled += 1
            found += _check_injected(disk, ceph, image, work)
    return found


def _check_injected(disk: Disk, ceph: CephCluster, image: str, work: Path) -> list[Violation]:
    assert disk.prepared is not None
    exported = work / f"{image}.raw"
    ceph.rbd("export", "--no-progress", f"vms/{image}", str(exported))
    guest = disk.prepared.get("guest") or {}
    found = []
    try:
        for path, content in disk.injected.items():
            read = read_guest_file(exported, "raw", guest.get("partition"), path, work)
            if read is None or read.content != content or read.mode & 0o7777 != 0o600:
                found.append(
                    Violation(
                        "injected-file",
                        f"{disk.name}: {path} reads {read!r}, injected {content!r} mode 0600",
                    )
                )
    finally:
        exported.unlink(missing_ok=True)
    return found
