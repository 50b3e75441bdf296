"""The formats work as a user runs it: prepare --backend/--format, snapshot --wait --json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from worker.cli.demo.image_server import ImageServer

MiB = 2**20
REPO = Path(__file__).resolve().parents[2]


def test_prepare_raw_backend_then_snapshot(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a served raw image
    name = unique("cli") + ".raw"
    write_raw_image(image_server.root / name, size=8 * MiB, data=b"snap" * 4096)
    instance = unique("vm")

    # When a user prepares a raw disk from it, declaring it raw, and snapshots the disk
    prepared = clean_cluster.cli(
        "prepare",
        image_server.url(name),
        "--image-id",
        unique("img"),
        "--instance",
        instance,
        "--size",
        "32M",
        "--backend",
        "raw",
        "--format",
        "raw",
        "--wait",
        "--json",
    )
    assert prepared.returncode == 0, prepared.stderr
    disk = json.loads(prepared.stdout)["disk"]
    target = f"{instance}/disk.qcow2"
    snapshot = clean_cluster.cli("snapshot", instance, target, "--compress", "--wait", "--json")

    # Then the disk is raw and the snapshot is a compressed qcow2 with its digest
    assert disk["format"] == "raw" and disk["backing_file"] is None
    assert snapshot.returncode == 0, snapshot.stderr
    image = json.loads(snapshot.stdout)
    path = clean_cluster.settings.snapshots_dir / target
    assert image["path"] == str(path) and image["format"] == "qcow2" and image["compressed"]
    assert image["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert image["virtual_size"] == 32 * MiB

    # And the same snapshot into a target outside the snapshots directory fails with the reason
    outside = clean_cluster.cli("snapshot", instance, "/etc/x.qcow2", "--wait")
    assert outside.returncode == 1
    assert "InvalidRequest" in outside.stderr and "is outside" in outside.stderr


def test_prepare_with_a_wrong_declared_format_fails_with_the_reason(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    name = unique("cli") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"r" * 512)
    done = clean_cluster.cli(
        "prepare",
        image_server.url(name),
        "--image-id",
        unique("img"),
        "--instance",
        unique("vm"),
        "--size",
        "8M",
        "--format",
        "qcow2",
        "--wait",
    )
    assert done.returncode == 1
    assert "ImageRefused" in done.stderr
    assert "declared qcow2 but its bytes are not a qcow2 image" in done.stderr
