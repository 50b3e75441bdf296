"""prepare_disk with file injection on real parts: worker processes, qemu-storage-daemon FUSE
exports, fuse2fs, loop devices and kernel mounts. Every test ends with the machine clean."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from domain.core.errors import (
    DeviceError,
    DiskFull,
    FilesystemNeedsRecovery,
    FilesystemRefused,
    PartitionNotFound,
)
from domain.core.models import (
    FileInjection,
    ImageSource,
    PreparedDisk,
    PrepareRequest,
)
from domain.guest.tools import daemons
from tests.integration.conftest import Cluster, unique
from tests.integration.devices import (
    MOTD,
    assert_released,
    device_steps,
    direct_disk,
    need_devices,
    send,
    step_states,
)
from tests.support.guests import (
    MiB,
    build_guest,
    fsck_clean,
    guest_link,
    list_guest_dir,
    read_guest_file,
)
from worker.cli.demo.image_server import ImageServer

LAYOUTS = ["mbr", "mbr-logical", "gpt", "bare"]


@pytest.fixture(autouse=True)
def _needs_devices() -> None:
    need_devices()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def serve_guest(image_server: ImageServer, layout: str, **kwargs: object) -> tuple[str, int]:
    """A raw guest disk under a fresh name on the image server: (name, filesystem offset)."""
    name = unique(f"guest-{layout}") + ".raw"
    built = build_guest(image_server.root / name, layout, **kwargs)  # type: ignore[arg-type]
    return name, built.offset


def injecting(
    image_server: ImageServer,
    name: str,
    files: list[FileInjection],
    *,
    partition: object = "auto",
    instance: str | None = None,
    host: str | None = None,
    backend: str = "qcow2",
) -> PrepareRequest:
    return PrepareRequest.model_validate(
        {
            "image": ImageSource(url=image_server.url(name), image_id=unique("img")),
            "disk": {
                "instance_id": instance or unique("vm"),
                "size_bytes": 64 * MiB,
                "backend": backend,
            },
            "inject": files,
            "partition": partition,
            "host": host,
        }
    )


KEY = FileInjection(
    path="/root/.ssh/authorized_keys",
    content=base64.b64encode(b"ssh-ed25519 AAAAC3Nza imgprep@test\n").decode(),
    encoding="base64",
    mode=0o600,
)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_injected_files_appear_in_the_qcow2_overlay_and_the_base_is_untouched(
    clean_cluster: Cluster, image_server: ImageServer, layout: str
) -> None:
    # Given a raw guest image with this layout, served over HTTP
    name, offset = serve_guest(image_server, layout)
    source_digest = sha256(image_server.root / name)
    request = injecting(image_server, name, [MOTD, KEY])

    # When it is prepared with two files to inject (partition: auto)
    prepared = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(request), timeout=120
    )

    # Then the result names the files, the partition and how it was mounted
    assert [f.path for f in prepared.injected] == ["/etc/motd", "/root/.ssh/authorized_keys"]
    assert prepared.injected[0].sha256 == hashlib.sha256(MOTD.data()).hexdigest()
    assert prepared.guest is not None and prepared.guest.mount == "fuse2fs"
    assert prepared.guest.filesystem == "ext4"
    expected = {"mbr": 1, "mbr-logical": 5, "gpt": 2, "bare": None}[layout]
    assert prepared.guest.partition == expected
    # and the guest view of the qcow2 overlay holds them with their content, mode and owner
    overlay = Path(prepared.disk.path)
    for item in (MOTD, KEY):
        found = read_guest_file(overlay, "qcow2", offset, item.path)
        assert found is not None, item.path
        assert (found.content, found.mode, found.uid) == (item.data(), item.mode, 0)
    assert fsck_clean(overlay, "qcow2", offset)
    # and the cached base is byte for byte the source: the writes went to the overlay
    base = Path(prepared.base.path)
    assert sha256(base) == source_digest
    assert read_guest_file(base, "raw", offset, "/etc/motd") is None
    assert_released(clean_cluster, request.disk.instance_id)


def test_qcow2_source_with_explicit_logical_partition(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given a qcow2 guest image with a logical partition
    raw = tmp_path / "guest.raw"
    offset = build_guest(raw, "mbr-logical").offset
    name = unique("guest") + ".qcow2"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            str(raw),
            str(image_server.root / name),
        ],
        check=True,
    )
    request = injecting(image_server, name, [MOTD], partition=5)

    # When it is prepared with partition 5 named explicitly
    prepared = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(request), timeout=120
    )

    # Then the file is in partition 5 of the overlay, and the cache holds the raw conversion
    found = read_guest_file(Path(prepared.disk.path), "qcow2", offset, "/etc/motd")
    assert found is not None and found.content == MOTD.data()
    assert prepared.base.format == "raw" and sha256(Path(prepared.base.path)) == sha256(raw)
    assert_released(clean_cluster, request.disk.instance_id)


def test_injection_into_a_raw_instance_disk(clean_cluster: Cluster) -> None:
    # Given a raw instance disk with a GPT, made directly in the instances directory
    disk = direct_disk(clean_cluster, "raw", layout="gpt")
    nested = FileInjection(path="/var/lib/new/dir/file", content="x")
    request = disk.request.model_copy(update={"inject": (MOTD, nested)})
    disk = replace(disk, request=request)

    # When the device steps of prepare_disk run for it on this host's queue
    operation = unique("op")
    steps = device_steps(disk, operation, host=clean_cluster.settings.host_id)
    done = PreparedDisk.model_validate(send(clean_cluster, steps, operation).get(timeout=60))

    # Then the files are in the raw disk itself, parents created as needed
    assert done.guest is not None and done.guest.partition == 2
    path = Path(disk.prepared.disk.path)
    found = read_guest_file(path, "raw", disk.offset, "/etc/motd")
    assert found is not None and (found.content, found.mode) == (MOTD.data(), 0o640)
    made = read_guest_file(path, "raw", disk.offset, "/var/lib/new/dir/file")
    assert made is not None and made.content == b"x" and made.mode == 0o644
    assert fsck_clean(path, "raw", disk.offset)
    disk.remove()
    assert_released(clean_cluster, request.disk.instance_id)


def test_links_in_the_guest_cannot_lead_to_host_files(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given a host folder, and a guest whose /etc/abs is an absolute link to that folder's path
    # and whose /etc/up is a ../../.. link climbing far above the guest root
    host_folder = tmp_path / "host-secrets"
    host_folder.mkdir()
    climb = "/".join([".."] * 12)
    name, offset = serve_guest(
        image_server,
        "mbr",
        files={"/etc/hostname": b"guest\n", f"{host_folder}/.keep": b""},
        links={"/etc/abs": str(host_folder), "/etc/up": climb},
    )
    through_absolute = FileInjection(path="/etc/abs/pwned-absolute", content="x")
    through_parent = FileInjection(path=f"/etc/up{host_folder}/pwned-parent", content="y")
    request = injecting(image_server, name, [through_absolute, through_parent])

    # When files are injected through both links
    prepared = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(request), timeout=120
    )

    # Then nothing was written on the host
    assert list(host_folder.iterdir()) == []
    # and both files are in the guest, where the guest itself would resolve the links
    overlay = Path(prepared.disk.path)
    inside = read_guest_file(overlay, "qcow2", offset, f"{host_folder}/pwned-absolute")
    assert inside is not None and inside.content == b"x"
    inside = read_guest_file(overlay, "qcow2", offset, f"{host_folder}/pwned-parent")
    assert inside is not None and inside.content == b"y"
    # and the links themselves are untouched
    assert guest_link(overlay, "qcow2", offset, "/etc/abs") == str(host_folder)
    assert guest_link(overlay, "qcow2", offset, "/etc/up") == climb
    assert_released(clean_cluster, request.disk.instance_id)


def test_bad_partition_number_fails_naming_it_and_leaves_nothing(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a disk with one partition, and a request for partition 7
    name, _ = serve_guest(image_server, "mbr")
    request = injecting(image_server, name, [MOTD], partition=7)

    # When it runs
    with pytest.raises(PartitionNotFound) as failure:
        clean_cluster.client.wait_prepared(clean_cluster.client.prepare_disk(request), timeout=120)

    # Then the error names the partition and what the disk has, and nothing is left behind:
    # no storage daemon, no mount, no loop device, no record
    assert "partition 7 not found" in str(failure.value)
    assert "MBR partitions 1" in str(failure.value)
    assert_released(clean_cluster, request.disk.instance_id)


def test_unknown_filesystem_fails_and_leaves_nothing(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a GPT disk whose only Linux partition holds a swap signature, not a filesystem
    name = unique("guest-swap") + ".raw"
    layout = build_guest(image_server.root / name, "gpt")
    with open(image_server.root / name, "r+b") as disk:
        disk.seek(layout.offset)
        disk.write(bytes(16 * MiB))
    partition = image_server.root / (name + ".part")
    with open(partition, "wb") as handle:
        handle.truncate(16 * MiB)
    subprocess.run(["mkswap", "-q", str(partition)], check=True, capture_output=True)
    with open(image_server.root / name, "r+b") as disk:
        disk.seek(layout.offset)
        disk.write(partition.read_bytes())
    partition.unlink()
    request = injecting(image_server, name, [MOTD])

    # When files are to be injected into it
    with pytest.raises(FilesystemRefused, match=r"partition 2 of .* holds no filesystem"):
        clean_cluster.client.wait_prepared(clean_cluster.client.prepare_disk(request), timeout=120)

    # Then nothing is left behind
    assert_released(clean_cluster, request.disk.instance_id)


def test_filesystem_larger_than_its_partition_fails_at_mount_and_leaves_nothing(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given an MBR disk whose 16 MiB partition holds the start of a 32 MiB ext4 filesystem
    name = unique("guest-overhang") + ".raw"
    layout = build_guest(image_server.root / name, "mbr")
    from worker.cli.demo.sample_images import ext4_image

    big = tmp_path / "big.ext4"
    ext4_image(big, 32, {"/etc/hostname": b"big\n"})
    with open(image_server.root / name, "r+b") as disk, open(big, "rb") as fs:
        disk.seek(layout.offset)
        disk.write(fs.read(16 * MiB))
    request = injecting(image_server, name, [MOTD])

    # When it runs, mapping finds ext4 but mounting refuses it
    result = clean_cluster.client.prepare_disk(request)
    with pytest.raises(FilesystemRefused, match="claims 33554432 bytes"):
        clean_cluster.client.wait_prepared(result, timeout=120)

    # Then the steps up to mapping succeeded, and nothing is left behind
    assert step_states(clean_cluster, result.id)[:4] == [
        ("fetch_to_cache", "SUCCESS"),
        ("create_overlay", "SUCCESS"),
        ("map_partitions", "SUCCESS"),
        ("mount_guest", "FAILURE"),
    ]
    assert_released(clean_cluster, request.disk.instance_id)


@pytest.mark.parametrize(("layout", "backend"), [("mbr", "qcow2"), ("bare", "raw")])
def test_a_filesystem_whose_journal_needs_recovery_is_refused_naming_the_cause(
    clean_cluster: Cluster, image_server: ImageServer, layout: str, backend: str
) -> None:
    # Given a guest whose ext4 journal needs recovery, as a guest that was not shut down
    # cleanly leaves it (fuse2fs cannot replay a journal, and crashes on such a filesystem)
    name, offset = serve_guest(image_server, layout)
    filesystem = f"{image_server.root / name}?offset={offset}"
    subprocess.run(
        ["debugfs", "-w", "-R", "feature needs_recovery", filesystem],
        check=True,
        capture_output=True,
    )
    features = subprocess.run(
        ["dumpe2fs", "-h", filesystem], check=True, capture_output=True, text=True
    ).stdout
    assert "needs_recovery" in features
    request = injecting(image_server, name, [MOTD], backend=backend)

    # When files are to be injected into it
    result = clean_cluster.client.prepare_disk(request)

    # Then mounting fails with the cause, not with a dead FUSE mount's "Transport endpoint is
    # not connected", and nothing is left mounted
    with pytest.raises(
        FilesystemNeedsRecovery, match=r"needs journal recovery: the guest .* not shut down cleanly"
    ):
        clean_cluster.client.wait_prepared(result, timeout=120)
    assert step_states(clean_cluster, result.id)[3] == ("mount_guest", "FAILURE")
    assert_released(clean_cluster, request.disk.instance_id)


def test_full_guest_filesystem_fails_at_inject_and_leaves_nothing(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given a bare 4 MiB ext4 disk that is nearly full
    name = unique("guest-full") + ".raw"
    from worker.cli.demo.sample_images import ext4_image

    ext4_image(image_server.root / name, 4, {"/filler": b"\xff" * 2_800_000})
    big = FileInjection(
        path="/etc/big", content=base64.b64encode(b"z" * 200_000).decode(), encoding="base64"
    )
    request = injecting(image_server, name, [big])

    # When a 200 kB file is injected
    result = clean_cluster.client.prepare_disk(request)
    with pytest.raises(DiskFull, match="no room for /etc/big"):
        clean_cluster.client.wait_prepared(result, timeout=120)

    # Then the inject step failed, no partial file is left in the guest, nothing on the host
    assert step_states(clean_cluster, result.id)[3:5] == [
        ("mount_guest", "SUCCESS"),
        ("inject_files", "FAILURE"),
    ]
    overlay = clean_cluster.settings.instances_dir / request.disk.instance_id / "disk"
    assert read_guest_file(overlay, "qcow2", 0, "/etc/big") is None
    for directory in ("/", "/etc"):
        assert not [n for n in list_guest_dir(overlay, "qcow2", 0, directory) if "imgprep" in n]
    assert fsck_clean(overlay, "qcow2", 0)
    assert_released(clean_cluster, request.disk.instance_id)


def test_a_disk_in_use_by_another_process_is_refused_and_leaves_nothing(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given an instance disk that another process (as a running VM would) holds open for writing
    name, _ = serve_guest(image_server, "mbr")
    request = injecting(image_server, name, [MOTD])
    plain = request.model_copy(update={"inject": ()})
    prepared = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(plain), timeout=120
    )
    holder_export, pidfile = tmp_path / "holder.raw", tmp_path / "holder.pid"
    holder_export.touch()
    subprocess.run(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f'{{"driver":"file","filename":"{prepared.disk.path}","node-name":"f"}}',
            "--blockdev",
            '{"driver":"qcow2","file":"f","node-name":"d"}',
            "--export",
            f'{{"type":"fuse","id":"e","node-name":"d","mountpoint":"{holder_export}",'
            '"writable":true}',
            "--daemonize",
            "--pidfile",
            str(pidfile),
        ],
        check=True,
    )
    holder = int(pidfile.read_text())
    try:
        # When files are to be injected into it
        with pytest.raises(DeviceError, match="another process using the image"):
            clean_cluster.client.wait_prepared(
                clean_cluster.client.prepare_disk(request), timeout=120
            )
    finally:
        os.kill(holder, signal.SIGTERM)
        daemons.wait_gone([holder], 30)

    # Then imgprep's own storage daemon, export and record are gone
    assert_released(clean_cluster, request.disk.instance_id)
