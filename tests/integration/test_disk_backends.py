"""Instance disk backends on real parts: qcow2 overlays and sparse raw copies, their format
records (disk.info), preallocation, and the conflicts between them."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.cache.directory import ImageCache
from domain.core import diskinfo
from domain.core.errors import DiskConflict
from domain.core.models import CachedImage, DiskSpec, ImageSource, PrepareRequest
from domain.core.runner import Limits, Runner
from domain.core.sparse import allocated_bytes
from domain.disks.backends import BACKENDS, FileBackend
from domain.disks.instance_disks import DiskContext, create_disk
from domain.formats.inspection import QCOW2_MAGIC
from harness.machine import assert_clean
from harness.redis_server import RedisServer
from tests.conftest import write_raw_image
from tests.fakes.references import InMemoryReferences
from tests.integration.conftest import Cluster, unique
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port
from worker.stores.redis_locks import RedisLockFactory

MiB = 2**20
LIMITS = Limits(cpu_seconds=30, address_space_bytes=2 * 2**30)


def qemu_compare(first: Path, first_format: str, second: Path, second_format: str) -> None:
    done = subprocess.run(
        ["qemu-img", "compare", "-f", first_format, "-F", second_format, str(first), str(second)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def request_for(
    image_server: ImageServer, name: str, *, instance: str, backend: str, size: int = 64 * MiB
) -> PrepareRequest:
    return PrepareRequest(
        image=ImageSource(url=image_server.url(name), image_id=unique("img")),
        disk=DiskSpec(instance_id=instance, size_bytes=size, backend=backend),  # type: ignore[arg-type]
    )


def test_raw_backend_is_a_sparse_grown_copy_of_the_base(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a raw image of 16 MiB with 2 MiB of data
    name = unique("base") + ".raw"
    write_raw_image(image_server.root / name, size=16 * MiB, data=b"\x5a" * MiB)
    request = request_for(image_server, name, instance=unique("vm"), backend="raw")

    # When a raw disk of 64 MiB is prepared from it
    result = clean_cluster.client.prepare_disk(request)
    prepared = clean_cluster.client.wait_prepared(result, timeout=60)

    # Then the disk is a raw file of 64 MiB without backing file, recorded as raw
    disk = Path(prepared.disk.path)
    assert (prepared.disk.format, prepared.disk.backing_file) == ("raw", None)
    assert disk.stat().st_size == 64 * MiB
    assert diskinfo.read_format(disk.parent, disk.name) == "raw"
    # and its guest view is the base followed by zeros
    qemu_compare(Path(prepared.base.path), "raw", disk, "raw")
    # and it stays sparse: only the data is allocated
    assert allocated_bytes(disk) <= 2 * MiB + 2 * MiB // 10
    # and the canvas chose the raw step
    view = clean_cluster.journal.read(result.id)
    assert view is not None
    assert [step.name for step in view.plan] == ["imgprep.fetch_to_cache", "imgprep.copy_raw_disk"]


def test_qcow2_backend_records_its_format(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    name = unique("base") + ".raw"
    write_raw_image(image_server.root / name, size=8 * MiB, data=b"q" * 4096)
    request = request_for(image_server, name, instance=unique("vm"), backend="qcow2")
    prepared = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(request), timeout=60
    )
    disk = Path(prepared.disk.path)
    record = json.loads((disk.parent / "disk.info").read_text())
    assert record == {"disk": "qcow2"}


def test_another_backend_for_an_existing_disk_is_a_conflict(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a qcow2 instance disk
    name = unique("base") + ".raw"
    write_raw_image(image_server.root / name, size=8 * MiB, data=b"c" * 4096)
    instance = unique("vm")
    first = request_for(image_server, name, instance=instance, backend="qcow2")
    clean_cluster.client.wait_prepared(clean_cluster.client.prepare_disk(first), timeout=60)

    # When the same disk is asked for as raw
    second = first.model_copy(update={"disk": first.disk.model_copy(update={"backend": "raw"})})
    with pytest.raises(DiskConflict, match="already exists as a qcow2 disk; the request wants"):
        clean_cluster.client.wait_prepared(clean_cluster.client.prepare_disk(second), timeout=60)

    # Then the qcow2 disk and its record are untouched
    disk = clean_cluster.settings.instances_dir / instance / "disk"
    assert disk.read_bytes()[:4] == QCOW2_MAGIC
    assert diskinfo.read_format(disk.parent, "disk") == "qcow2"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: its leftovers are this test's alone."""
    server = RedisServer(tmp_path / "redis", free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def locks(own_redis: RedisServer) -> RedisLockFactory:
    return RedisLockFactory(own_redis.client(), lease=10.0, renew_every=2.0, wait=30.0)


def disk_context(
    cache: Path, instances: Path, runner: Runner, locks: RedisLockFactory, preallocate: bool = False
) -> DiskContext:
    return DiskContext(
        cache=ImageCache(cache),
        instances_dir=instances,
        host="here",
        runner=runner,
        locks=locks,
        references=InMemoryReferences(),
        limits=LIMITS,
        preallocate=preallocate,
    )


def cached(path: Path, fmt: str, virtual_size: int) -> CachedImage:
    return CachedImage(
        key=path.name,
        image_id=path.name,
        path=str(path),
        format=fmt,
        virtual_size=virtual_size,
        source_sha256="0" * 64,
    )


def test_raw_disk_from_a_qcow2_base_is_converted(
    tmp_path: Path, runner: Runner, locks: RedisLockFactory, own_redis: RedisServer
) -> None:
    # Given a qcow2 base in a cache kept as downloaded (force_raw off)
    source = write_raw_image(tmp_path / "src.raw", size=8 * MiB, data=b"\x11" * 65536)
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source), str(base)],
                   check=True)  # fmt: skip
    instances = tmp_path / "instances"
    instances.mkdir()

    # When a raw disk of 32 MiB is created from it
    disk = create_disk(
        BACKENDS["raw"],
        cached(base, "qcow2", 8 * MiB),
        DiskSpec(instance_id="vm", size_bytes=32 * MiB, backend="raw"),
        disk_context(tmp_path, instances, runner, locks),
    )

    # Then it is raw, grown, and holds the base's guest view
    path = Path(disk.path)
    assert path.stat().st_size == 32 * MiB and path.read_bytes()[:4] != QCOW2_MAGIC
    qemu_compare(base, "qcow2", path, "raw")
    assert_clean(
        client=own_redis.client(),
        cache_dir=tmp_path,
        instances_dir=instances,
        state_dir=tmp_path,
    )


@pytest.mark.parametrize("backend", ["raw", "qcow2"])
def test_preallocation_reserves_the_full_size(
    backend: FileBackend, tmp_path: Path, runner: Runner, locks: RedisLockFactory
) -> None:
    # Given a small raw base
    base = write_raw_image(tmp_path / "base", size=4 * MiB, data=b"p" * 4096)
    instances = tmp_path / "instances"
    instances.mkdir()

    # When disks of 48 MiB are created with and without preallocation
    disks = {
        reserve: Path(
            create_disk(
                BACKENDS[backend],
                cached(base, "raw", 4 * MiB),
                DiskSpec(instance_id=f"vm-{reserve}", size_bytes=48 * MiB, backend=backend),
                disk_context(tmp_path, instances, runner, locks, preallocate=reserve),
            ).path
        )
        for reserve in (False, True)
    }

    # Then the preallocated one has its full size reserved, the other stays sparse
    assert allocated_bytes(disks[True]) >= 48 * MiB
    assert allocated_bytes(disks[False]) < 4 * MiB
    # and preallocation did not change what the guest sees
    fmt = "raw" if backend == "raw" else "qcow2"
    qemu_compare(disks[False], fmt, disks[True], fmt)
