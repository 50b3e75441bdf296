"""The `imgprep` command as a user runs it: prepare --wait --json, status, demo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.conftest import write_raw_image
from tests.integration.conftest import PRIVSEP, Cluster, unique
from worker.cli.demo.image_server import ImageServer

MiB = 2**20
REPO = Path(__file__).resolve().parents[2]


def test_prepare_wait_json_then_status(clean_cluster: Cluster, image_server: ImageServer) -> None:
    # Given a served image
    name = unique("cli") + ".raw"
    path = write_raw_image(image_server.root / name, size=8 * MiB, data=b"cli" * 1000)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    instance = unique("vm")

    # When a user prepares a disk and waits for it
    done = clean_cluster.cli(
        "prepare",
        image_server.url(name),
        "--image-id",
        unique("img"),
        "--instance",
        instance,
        "--size",
        "64M",
        "--checksum",
        f"sha256:{digest}",
        "--wait",
        "--json",
    )

    # Then the JSON result names the overlay and the cached base
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["disk"]["path"] == str(clean_cluster.settings.instances_dir / instance / "disk")
    assert result["disk"]["virtual_size"] == 64 * MiB
    assert result["base"]["path"].startswith(str(clean_cluster.settings.cache_dir))
    assert Path(result["base"]["path"]).is_file()

    # And status shows both steps done, as text and as JSON
    text = clean_cluster.cli("status", result["task_id"])
    assert text.returncode == 0
    assert "fetch_to_cache" in text.stdout and "create_overlay" in text.stdout
    view = json.loads(clean_cluster.cli("status", result["task_id"], "--json").stdout)
    assert view["state"] == "SUCCESS"
    assert [s["name"] for s in view["steps"]] == ["fetch_to_cache", "create_overlay"]
    assert all(s["state"] == "SUCCESS" and s["seconds"] is not None for s in view["steps"])


def test_prepare_failure_exits_non_zero_with_the_reason(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given an image whose checksum the request gets wrong
    name = unique("cli") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"x" * 512)
    args = [
        "prepare",
        image_server.url(name),
        "--image-id",
        unique("img"),
        "--instance",
        unique("vm"),
        "--size",
        "64M",
        "--checksum",
        "sha256:" + "1" * 64,
        "--wait",
    ]

    # When it is prepared with --wait, then with --wait --json
    done = clean_cluster.cli(*args)
    as_json = clean_cluster.cli(*args, "--json")

    # Then both exit 1 with the error class and its message
    assert done.returncode == 1
    assert "ChecksumMismatch" in done.stderr and "expected sha256:1111" in done.stderr
    assert as_json.returncode == 1
    failure = json.loads(as_json.stdout)
    assert failure["error_type"] == "ChecksumMismatch"

    # And status shows where it failed and that the next step never ran
    view = json.loads(clean_cluster.cli("status", failure["task_id"], "--json").stdout)
    assert view["state"] == "FAILURE" and view["error_type"] == "ChecksumMismatch"
    assert [(s["name"], s["state"]) for s in view["steps"]] == [
        ("fetch_to_cache", "FAILURE"),
        ("create_overlay", "SKIPPED"),
    ]
    assert clean_cluster.cli("status", failure["task_id"]).returncode == 1


def test_prepare_rejects_a_bad_request_before_sending(clean_cluster: Cluster) -> None:
    done = clean_cluster.cli(
        "prepare",
        "http://x/i",
        "--image-id",
        "i",
        "--instance",
        "../x",
        "--size",
        "1G",
    )
    assert done.returncode == 2
    assert "disk.instance_id" in done.stderr
    done = clean_cluster.cli(
        "prepare",
        "http://x/i",
        "--image-id",
        "i",
        "--instance",
        "x",
        "--size",
        "lots",
    )
    assert done.returncode == 2
    assert "not a size" in done.stderr


def test_demo_prepares_two_disks_with_one_download(clean_cluster: Cluster) -> None:
    done = clean_cluster.cli("demo", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "prepared    2 of 2 disks" in done.stdout
    assert "downloads   1 GET of the image for 2 requests" in done.stdout
    assert "stopped     worker" in done.stdout
    assert done.stdout.count("from the disk itself") == 2  # the injected file, read back
    if PRIVSEP:  # the demo's worker runs separated: its pool as imgprep, its helper as root
        (line,) = [line for line in done.stdout.splitlines() if "privileges" in line]
        assert "run as imgprep (uid" in line and "no capabilities" in line, line
        assert "helper" in line and "as root (uid 0)" in line, line
