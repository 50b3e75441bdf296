"""The convert step and the snapshot canvas on real parts: cache mode by O_DIRECT probe (tmpfs,
ramfs and a regular filesystem), PROGRESS states through the result backend, snapshots that
round-trip to the disk's guest view, targets confined to the snapshots directory.

tmpfs supports O_DIRECT since Linux 6.6, so on current kernels it gets `-t none` like ext4;
ramfs never does, and is the filesystem that proves the `writeback` fallback here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.core.errors import DiskConflict, DiskNotFound, InvalidRequest
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from domain.core.runner import Limits, Runner
from domain.formats.conversion import convert_image
from domain.formats.snapshot_models import ConvertedImage, ConvertJob, SnapshotRequest
from harness.machine import temp_files
from harness.redis_server import RedisServer
from tests.conftest import need_root, unable, write_raw_image
from tests.integration.conftest import Cluster, unique
from worker.cli.demo.image_server import ImageServer
from worker.stores.redis_locks import RedisLockFactory

MiB = 2**20
LIMITS = Limits(cpu_seconds=30, address_space_bytes=2 * 2**30)
TMPFS = Path("/dev/shm")


@pytest.fixture
def tmpfs_dir() -> Iterator[Path]:
    if not TMPFS.is_dir() or "tmpfs" not in Path("/proc/mounts").read_text():
        unable("no tmpfs at /dev/shm")
    path = TMPFS / f"imgprep-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    shutil.rmtree(path)


@pytest.fixture
def ramfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mount of the test's own: a filesystem that refuses O_DIRECT."""
    need_root()
    path = tmp_path / "ramfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def opens_with_o_direct(directory: Path) -> bool:
    """The test's own probe, independent of the code under test."""
    probe = directory / "probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


@pytest.fixture
def locks(redis_server: RedisServer) -> RedisLockFactory:
    return RedisLockFactory(redis_server.client(), lease=10.0, renew_every=2.0, wait=30.0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_compare(first: Path, first_format: str, second: Path, second_format: str) -> None:
    done = subprocess.run(
        ["qemu-img", "compare", "-f", first_format, "-F", second_format, str(first), str(second)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def guest_writes(disk: Path, fmt: str, pattern: int, offset: str, length: str) -> None:
    """What a guest would write: qemu-io, through the disk's own format."""
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", str(disk)],
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("where", ["tmpfs", "ramfs", "regular"])
def test_convert_picks_cache_mode_by_o_direct_and_succeeds(
    where: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    runner: Runner,
    *,
    locks: RedisLockFactory,
    redis_server: RedisServer,
) -> None:
    # Given a raw image with data, and a target directory on tmpfs, ramfs or the regular
    # filesystem (ext4 here)
    source = write_raw_image(tmp_path / "source.raw", size=32 * MiB, data=os.urandom(MiB))
    if where == "regular":
        target_dir = tmp_path / "out"
        target_dir.mkdir()
    else:
        target_dir = request.getfixturevalue(f"{where}_dir")
    expected = {"regular": "none", "ramfs": "writeback"}.get(
        where, "none" if opens_with_o_direct(target_dir) else "writeback"
    )
    job = ConvertJob(
        source=str(source),
        source_format="raw",
        target=str(target_dir / "image.qcow2"),
        target_format="qcow2",
    )

    # When it is converted to qcow2 there
    def convert() -> ConvertedImage:
        return convert_image(
            job,
            source_roots=(tmp_path,),
            target_roots=(target_dir,),
            runner=runner,
            locks=locks,
            limits=LIMITS,
        )

    converted = convert()

    # Then qemu-img wrote it with the cache mode the filesystem allows, and it is the source
    assert converted.cache_mode == expected
    target = Path(converted.path)
    qemu_compare(source, "raw", target, "qcow2")
    assert (converted.format, converted.virtual_size) == ("qcow2", 32 * MiB)
    assert converted.sha256 == sha256(target) and converted.size_bytes == target.stat().st_size
    assert not temp_files(target_dir)
    # and converting again finds it instead of writing it twice
    written = target.stat().st_mtime_ns
    assert convert() == converted
    assert target.stat().st_mtime_ns == written
    assert not list(redis_server.client().scan_iter(match="imgprep:lock:*"))


def test_convert_refuses_paths_outside_its_roots_and_foreign_targets(
    tmp_path: Path, runner: Runner, locks: RedisLockFactory
) -> None:
    (tmp_path / "in").mkdir()
    source = write_raw_image(tmp_path / "in" / "source.raw", size=MiB, data=b"s")
    out = tmp_path / "out"
    out.mkdir()

    def convert(target: Path, source_path: Path = source) -> ConvertedImage:
        job = ConvertJob(
            source=str(source_path),
            source_format="raw",
            target=str(target),
            target_format="raw",
        )
        return convert_image(
            job,
            source_roots=(tmp_path / "in",),
            target_roots=(out,),
            runner=runner,
            locks=locks,
            limits=LIMITS,
        )

    with pytest.raises(InvalidRequest, match=r"the target .* is outside the configured roots"):
        convert(tmp_path / "elsewhere.raw")
    with pytest.raises(InvalidRequest, match="the source /etc/passwd is outside"):
        convert(out / "x.raw", Path("/etc/passwd"))
    (out / "taken.raw").write_bytes(b"someone else's file")
    with pytest.raises(DiskConflict, match="already exists and is not this conversion"):
        convert(out / "taken.raw")
    assert (out / "taken.raw").read_bytes() == b"someone else's file"


def prepare(
    cluster: Cluster, image_server: ImageServer, *, backend: str, data: bytes, size: int
) -> Path:
    name = unique("snapbase") + ".raw"
    write_raw_image(image_server.root / name, size=size, data=data)
    request = PrepareRequest(
        image=ImageSource(url=image_server.url(name), image_id=unique("img")),
        disk=DiskSpec(instance_id=unique("vm"), size_bytes=2 * size, backend=backend),  # type: ignore[arg-type]
    )
    prepared = cluster.client.wait_prepared(cluster.client.prepare_disk(request), timeout=120)
    return Path(prepared.disk.path)


def snapshot_with_states(
    cluster: Cluster, request: SnapshotRequest, timeout: float = 180
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send imgprep.snapshot and collect every state the result backend publishes for it."""
    task_id = str(uuid.uuid4())
    pubsub = cluster.redis.pubsub()
    pubsub.subscribe(f"celery-task-meta-{task_id}")
    try:
        result = cluster.app.send_task(
            "imgprep.snapshot",
            args=[request.model_dump(mode="json")],
            queue="imgprep",
            task_id=task_id,
        )
        states: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=5)
            if message is None or message["type"] != "message":
                continue
            states.append(json.loads(message["data"]))
            if states[-1]["status"] in ("SUCCESS", "FAILURE"):
                break
        return dict(result.get(timeout=10)), states
    finally:
        pubsub.close()


def test_snapshot_of_an_overlay_round_trips_with_progress(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a qcow2 overlay on a base of 128 MiB of data, and a guest that wrote into it
    overlay = prepare(
        clean_cluster, image_server, backend="qcow2", data=os.urandom(64 * MiB), size=128 * MiB
    )
    guest_writes(overlay, "qcow2", 0xCD, "1M", "2M")
    guest_writes(overlay, "qcow2", 0xEF, "200M", "1M")
    target = f"{unique('snaps')}/vm-disk.qcow2"

    # When it is snapshotted to a compressed qcow2, watching the result backend
    request = SnapshotRequest(
        instance_id=overlay.parent.name, target=target, format="qcow2", compress=True
    )
    result, states = snapshot_with_states(clean_cluster, request)

    # Then the image is under the snapshots directory and holds the overlay's guest view
    image = ConvertedImage.model_validate(result)
    path = clean_cluster.settings.snapshots_dir / target
    assert image.path == str(path) and image.format == "qcow2" and image.compressed
    assert image.source == str(overlay) and image.source_format == "qcow2"
    qemu_compare(overlay, "qcow2", path, "qcow2")
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-f", "qcow2", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert "backing-filename" not in info  # standalone
    assert image.virtual_size == info["virtual-size"] == 256 * MiB
    assert image.sha256 == sha256(path)
    assert image.cache_mode == "none"
    # and progress was published while it ran, in order, as the PROGRESS state
    progress = [s["result"] for s in states if s["status"] == "PROGRESS"]
    percents = [p["percent"] for p in progress]
    assert any(0 < p < 100 for p in percents), states
    assert percents == sorted(percents)
    assert {p["step"] for p in progress} == {"convert"}
    assert {p["total"] for p in progress} == {256 * MiB}
    assert not temp_files(clean_cluster.settings.snapshots_dir)


def test_snapshot_of_a_raw_disk_without_o_direct_round_trips(
    clean_cluster: Cluster, image_server: ImageServer, ramfs_dir: Path
) -> None:
    # Given a raw instance disk the guest wrote into, and a worker of a host whose snapshots
    # directory is on ramfs (no O_DIRECT)
    disk = prepare(clean_cluster, image_server, backend="raw", data=b"\x42" * MiB, size=16 * MiB)
    guest_writes(disk, "raw", 0x17, "20M", "1M")
    host = unique("tmpfs-host")
    worker = clean_cluster.start_worker(
        "ramfs",
        env={"IMGPREP_HOST_ID": host, "IMGPREP_SNAPSHOTS_DIR": str(ramfs_dir)},
        extra_args=("-Q", f"imgprep.host.{host}"),
    )
    try:
        # When it is snapshotted there, as raw
        request = SnapshotRequest(
            instance_id=disk.parent.name, target="disk.raw", format="raw", host=host
        )
        result, _ = snapshot_with_states(clean_cluster, request)
    finally:
        worker.stop()

    # Then the image was written with writeback and equals the disk
    image = ConvertedImage.model_validate(result)
    assert image.path == str(ramfs_dir / "disk.raw") and image.cache_mode == "writeback"
    assert Path(image.path).read_bytes() == disk.read_bytes()
    assert image.sha256 == sha256(disk)
    assert not temp_files(ramfs_dir)


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        ("../escape.qcow2", InvalidRequest, "'..' is not a valid name"),
        ("/etc/evil.qcow2", InvalidRequest, "/etc/evil.qcow2 is outside"),
        ("image.qcow2.part", InvalidRequest, "are reserved"),
    ],
)
def test_snapshot_targets_stay_under_the_snapshots_directory(
    clean_cluster: Cluster,
    image_server: ImageServer,
    target: str,
    error: type[Exception],
    message: str,
) -> None:
    disk = prepare(clean_cluster, image_server, backend="qcow2", data=b"t" * 4096, size=MiB)
    request = SnapshotRequest(instance_id=disk.parent.name, target=target)
    result = clean_cluster.client.send("imgprep.snapshot", request.model_dump(mode="json"))
    with pytest.raises(error, match=message):
        result.get(timeout=60)
    assert not Path("/etc/evil.qcow2").exists()
    assert not (clean_cluster.settings.snapshots_dir.parent / "escape.qcow2").exists()


def test_snapshot_of_an_unknown_disk_is_disk_not_found(clean_cluster: Cluster) -> None:
    request = SnapshotRequest(instance_id=unique("vm"), target=unique("t") + ".qcow2")
    result = clean_cluster.client.send("imgprep.snapshot", request.model_dump(mode="json"))
    with pytest.raises(DiskNotFound, match="there is no disk"):
        result.get(timeout=60)
