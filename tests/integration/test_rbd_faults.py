"""The rbd backend under faults, on real processes: a process killed at each point of an import
and of a clone (a real SIGKILL of its whole process group, qemu-img included), an OSD killed
and started again under a burst, and settings that cannot work (unknown pool, missing key,
cluster down), each ending typed and leaving nothing in Ceph, Redis or the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from domain.core.errors import CephConfigInvalid, CephUnavailable
from domain.rbd import names
from harness.privileges import WORKER_USER
from tests.integration.ceph import assert_rbd_clean, rbd_leftovers
from tests.integration.conftest import PRIVSEP, Cluster, ClusterFactory, unique
from tests.integration.test_rbd import MiB, rbd_request, served_image
from tests.support.cli import REPO
from worker.cli.demo.ceph_cluster import CephCluster
from worker.cli.demo.image_server import ImageServer


def killed_at(cluster: Cluster, step: str, kill_after: str, request_json: str) -> None:
    """Run `step` in a process of its own that kills its group at `kill_after`, as the workers'
    user when the workers run separated."""
    user = ["runuser", "-u", WORKER_USER, "--"] if PRIVSEP else []
    done = subprocess.run(
        [
            *user,
            sys.executable,
            "-m",
            "tests.support.killed_rbd_step",
            step,
            kill_after,
            request_json,
        ],
        env={**cluster.env, "IMGPREP_HOST_ID": "rbd-a"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        start_new_session=True,
        check=False,
    )
    assert done.returncode in (-9, 128 + 9), done.stderr[-2000:]  # runuser reports 137


@pytest.mark.parametrize(
    ("step", "kill_after"),
    [
        ("import", "convert"),  # qemu-img writing into <key>.part.<fence>
        ("import", "snap protect"),  # complete but not renamed
        ("clone", "clone"),  # a clone not yet grown (after resize: the same, grown)
    ],
)
def test_a_process_killed_in_an_import_or_a_clone_leaves_nothing_half_made(
    clean_rbd: Cluster, ceph: CephCluster, image_server: ImageServer, step: str, kill_after: str
) -> None:
    # Given a new image of 48 MiB of data
    name = served_image(image_server, size=48 * MiB)
    (image_server.root / name).write_bytes(os.urandom(48 * MiB))
    request = rbd_request(image_server, name, size=128 * MiB)
    key = names.image_name(request.image.image_id)
    disk = names.disk_image(request.disk.instance_id, "disk")

    # When a process importing (or cloning) it is killed with its tools at that point
    killed_at(clean_rbd, step, kill_after, request.model_dump_json())

    # Then nothing a clone could use is under a final name: only a temporary, if anything
    if step == "import":
        assert key not in ceph.images("images")
    assert disk not in ceph.images("vms")
    assert rbd_leftovers(ceph), "the kill came before anything was made"

    # When the request is sent to the workers
    prepared = clean_rbd.client.wait_prepared(clean_rbd.client.prepare_disk(request), timeout=240)

    # Then it succeeds: the image complete with its protected snapshot, the disk grown, and no
    # temporary, lock or record of one left anywhere
    assert [s["protected"] for s in ceph.snapshots("images", key)] == ["true"]
    assert prepared.disk.virtual_size == 128 * MiB
    info = ceph.rbd_json("info", f"vms/{disk}")
    assert isinstance(info, dict) and info["size"] == 128 * MiB
    ceph.rbd("rm", f"vms/{disk}")
    assert_rbd_clean(clean_rbd, ceph)


def test_an_osd_killed_mid_burst_delays_requests_but_loses_none(
    cluster_factory: ClusterFactory,
    ceph_factory: Callable[..., CephCluster],
    image_server: ImageServer,
) -> None:
    # Given a cluster whose OSD keeps its data on disk (cephx off), and workers on two hosts
    ceph = ceph_factory(persistent=True, cephx=False)
    cluster = cluster_factory("osd", ceph.env())
    cluster.add_workers(("a", {"IMGPREP_HOST_ID": "rbd-a"}), ("b", {"IMGPREP_HOST_ID": "rbd-b"}))
    name = served_image(image_server, size=64 * MiB)
    image_id = unique("img")
    requests = [
        rbd_request(image_server, name, image_id=image_id, host=("rbd-a", "rbd-b")[i % 2])
        for i in range(8)
    ]

    # When a burst of prepares runs and the OSD is killed and started again 3 s later
    results = [cluster.client.prepare_disk(request) for request in requests]
    ceph.kill_osd()
    subprocess.run(["sleep", "3"], check=True)
    ceph.start_osd()

    # Then every prepare ends with its disk, all clones of one image
    prepared = [cluster.client.wait_prepared(result, timeout=300) for result in results]
    assert len({p.disk.backing_file for p in prepared}) == 1
    for request in requests:
        assert names.disk_image(request.disk.instance_id, "disk") in ceph.images("vms")
    assert rbd_leftovers(ceph) == []
    cluster.assert_clean()


def test_settings_that_cannot_work_fail_typed_and_leave_nothing(
    cluster_factory: ClusterFactory, ceph: CephCluster, image_server: ImageServer
) -> None:
    # Given workers of one Redis on four hosts: two name a pool that does not exist (of disks,
    # of images), one a keyring that is not there, one a cluster that is down
    dead = ceph.directory / "client" / "dead.conf"
    dead.write_text(ceph.conf.read_text().replace(f":{ceph.port}", ":9"))
    dead.chmod(0o644)
    cluster = cluster_factory("badrbd", {**ceph.env(), "IMGPREP_RBD__CONNECT_TIMEOUT_SECONDS": "2"})
    cluster.add_workers(
        ("nopool", {"IMGPREP_HOST_ID": "nopool", "IMGPREP_RBD__POOL": "nosuchpool"}),
        ("noimages", {"IMGPREP_HOST_ID": "noimages", "IMGPREP_RBD__IMAGES_POOL": "nosuchpool"}),
        ("nokey", {"IMGPREP_HOST_ID": "nokey", "IMGPREP_RBD__KEYRING": "/nonexistent.keyring"}),
        ("down", {"IMGPREP_HOST_ID": "down", "IMGPREP_RBD__CONF": str(dead)}),
    )
    name = served_image(image_server)
    cases = {
        "nopool": CephConfigInvalid,
        "noimages": CephConfigInvalid,
        "nokey": CephConfigInvalid,
        "down": CephUnavailable,
    }
    before = set(ceph.images("images")) | set(ceph.images("vms"))
    for host, error in cases.items():
        request = rbd_request(image_server, name, host=host)
        # When a disk is prepared there, Then the error names its class
        with pytest.raises(error):
            cluster.client.wait_prepared(cluster.client.prepare_disk(request), timeout=180)
    # and no disk was made in Ceph (the host whose disk pool is missing imported the image,
    # complete, as a cache would keep it), and nothing is left in Redis or on the machine
    assert set(ceph.images("vms")) <= before
    for made in set(ceph.images("images")) - before:
        assert [s["protected"] for s in ceph.snapshots("images", made)] == ["true"]
        ceph.rbd("snap", "unprotect", f"images/{made}@snap")
        ceph.rbd("snap", "purge", f"images/{made}")
        ceph.rbd("rm", f"images/{made}")
    assert_rbd_clean(cluster, ceph)
