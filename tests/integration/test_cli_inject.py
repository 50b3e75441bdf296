"""`imgprep prepare --inject GUEST_PATH=LOCAL_FILE --partition N` as a user runs it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.conftest import Cluster, unique
from tests.integration.devices import assert_released, need_devices
from tests.support.guests import build_guest, read_guest_file
from worker.cli.demo.image_server import ImageServer


@pytest.fixture(autouse=True)
def _needs_devices() -> None:
    need_devices()


def test_prepare_injects_local_files_with_their_modes(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given a served guest image with a logical partition, and two local files
    name = unique("cli-guest") + ".raw"
    offset = build_guest(image_server.root / name, "mbr-logical").offset
    motd = tmp_path / "motd"
    motd.write_text("hello from the CLI\n")
    key = tmp_path / "authorized_keys"
    key.write_bytes(b"ssh-ed25519 AAAA test\n")
    os.chmod(key, 0o600)
    instance = unique("vm")

    # When a user prepares a disk injecting both into partition 5
    done = clean_cluster.cli(
        "prepare",
        image_server.url(name),
        "--image-id",
        unique("img"),
        "--instance",
        instance,
        "--size",
        "64M",
        "--inject",
        f"/etc/motd={motd}",
        "--inject",
        f"/root/.ssh/authorized_keys={key}",
        "--partition",
        "5",
        "--wait",
        "--json",
    )

    # Then the result lists the files, and the disk holds them with the local files' modes
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [(f["path"], f["mode"]) for f in result["injected"]] == [
        ("/etc/motd", 0o644),
        ("/root/.ssh/authorized_keys", 0o600),
    ]
    assert result["guest"] == {"partition": 5, "filesystem": "ext4", "mount": "fuse2fs"}
    disk = Path(result["disk"]["path"])
    found = read_guest_file(disk, "qcow2", offset, "/root/.ssh/authorized_keys")
    assert found is not None and (found.content, found.mode) == (key.read_bytes(), 0o600)
    assert_released(clean_cluster, instance)


def test_prepare_refuses_an_unreadable_local_file_before_sending(
    clean_cluster: Cluster, tmp_path: Path
) -> None:
    done = clean_cluster.cli(
        "prepare",
        "http://x/i",
        "--image-id",
        "i",
        "--instance",
        "vm",
        "--size",
        "1G",
        "--inject",
        f"/etc/motd={tmp_path / 'absent'}",
    )
    assert done.returncode == 2
    assert "cannot read" in done.stderr
    bad = clean_cluster.cli(
        "prepare",
        "http://x/i",
        "--image-id",
        "i",
        "--instance",
        "vm",
        "--size",
        "1G",
        "--partition",
        "largest",
    )
    assert bad.returncode == 2
    assert "not a partition number" in bad.stderr
