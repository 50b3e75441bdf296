"""The shared cache against faults and hostile inputs, on real workers (issue 11, defects 4, 8, 9
and 11): a lock holder paused past its lease, step messages naming files outside the cache,
guest-written headers in raw disks, conflicting prepares. Every test ends with the machine
clean."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from domain.cache.directory import ImageCache, cache_key
from domain.core.errors import BaseImageMissing, DiskConflict, InvalidRequest
from domain.core.models import (
    CacheEvictionReport,
    DiskSpec,
    ImageSource,
    PreparedDisk,
    PrepareRequest,
)
from domain.formats.inspection import QCOW2_MAGIC
from domain.formats.snapshot_models import ConvertJob
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, ClusterFactory, unique
from tests.support.waiting import wait_for
from worker.app.routing import host_queue
from worker.cli.demo.image_server import ImageServer
from worker.stores.redis_locks import LOCK_PREFIX
from worker.stores.redis_references import REFS_PREFIX
from worker.stores.replies import text

MiB = 2**20


def serve(image_server: ImageServer, size: int = 4 * MiB) -> tuple[str, str]:
    """A raw image with random data on the image server: its name and sha256."""
    name = unique("integrity") + ".raw"
    path = write_raw_image(image_server.root / name, size=size, data=os.urandom(512 * 1024))
    return name, hashlib.sha256(path.read_bytes()).hexdigest()


def request_for(
    url: str,
    image_id: str,
    *,
    backend: str = "qcow2",
    instance: str | None = None,
    size: int = 16 * MiB,
) -> PrepareRequest:
    return PrepareRequest(
        image=ImageSource(url=url, image_id=image_id),
        disk=DiskSpec(
            instance_id=instance or unique("vm"),
            size_bytes=size,
            backend=backend,  # type: ignore[arg-type]
        ),
    )


def send_step(cluster: Cluster, step: str, *args: Any) -> AsyncResult:
    """A step message sent straight to this host's queue, as anyone with broker access can."""
    return cluster.app.send_task(step, args=list(args), queue=host_queue(cluster.settings.host_id))


def holders(cluster: Cluster, image_id: str) -> list[str]:
    return sorted(text(h) for h in cluster.redis.hkeys(REFS_PREFIX + cache_key(image_id)))


def sha256(path: Path, length: int | None = None) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read(length) if length else handle.read()).hexdigest()


def guest_writes(disk: Path, data: bytes) -> None:
    """What a guest can do to its raw disk: write any bytes at offset 0."""
    with open(disk, "r+b") as handle:
        handle.write(data)


def qcow2_header(tmp_path: Path, backing: Path) -> bytes:
    """The bytes of a valid qcow2 image whose backing file is `backing`."""
    image = tmp_path / f"{unique('header')}.qcow2"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing)]
    subprocess.run([*argv, str(image), "1M"], check=True)
    return image.read_bytes()


# -- defect 4: a paused holder --------------------------------------------------------------------


def cache_temporaries(cluster: Cluster, key: str) -> list[Path]:
    return sorted(cluster.settings.cache_dir.glob(f"{key}.*part*"))


def downloading_holder(cluster: Cluster, key: str) -> int | None:
    """The pid of the process holding `cache:<key>` once its download has written bytes."""
    token = cluster.redis.get(f"{LOCK_PREFIX}cache:{key}")
    parts = [p for p in cache_temporaries(cluster, key) if p.stat().st_size > 0]
    if token is None or not parts:
        return None
    return int(text(token).split(":")[1])


def test_a_holder_paused_past_its_lease_fails_over_with_lock_lost_and_finds_the_entry(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given a cluster with a 2 s lease, and an image that takes seconds to download
    cluster = cluster_factory(
        "paused", {"IMGPREP_LOCK__LEASE_SECONDS": "2", "IMGPREP_LOCK__RENEW_SECONDS": "0.5"}
    )
    cluster.add_worker("a", concurrency=1)
    cluster.add_worker("b", concurrency=1)
    name, digest = serve(image_server, size=24 * MiB)
    image_id = unique("img")
    key = cache_key(image_id)
    url = image_server.url(name)
    image_server.bytes_per_second = 6 * MiB
    try:
        first = cluster.client.prepare_disk(request_for(url, image_id, size=32 * MiB))
        # When the pool process downloading it is paused (SIGSTOP) past its lease ...
        paused = wait_for(lambda: downloading_holder(cluster, key), timeout=60, what="a download")
        os.kill(paused, signal.SIGSTOP)
        try:
            # ... while another request for the image takes over and caches it
            second = cluster.client.prepare_disk(request_for(url, image_id, size=32 * MiB))
            done = cluster.client.wait_prepared(second, timeout=120)
            assert image_server.gets(name) == 2
        finally:
            os.kill(paused, signal.SIGCONT)
        # Then the paused one, resumed, fails over (LockLost, retried) and finds the entry
        resumed = cluster.client.wait_prepared(first, timeout=120)
    finally:
        image_server.bytes_per_second = None
    entry = cluster.settings.cache_dir / key
    assert resumed.base.path == done.base.path == str(entry)
    assert image_server.gets(name) == 2
    view = cluster.journal.read(first.id)
    assert view is not None
    fetch = next(r for r in view.records.values() if r.name == "imgprep.fetch_to_cache")
    assert fetch.attempts == 2 and fetch.state == "SUCCESS"
    logs = "".join(w.log_path.read_text() for w in cluster.workers)
    assert '"error_class": "LockLost"' in logs
    # and the entry is whole: its bytes are the source's and its record describes it
    assert sha256(entry) == digest
    assert ImageCache(cluster.settings.cache_dir).lookup(key) is not None
    assert cache_temporaries(cluster, key) == []
    cluster.assert_clean()


# -- defect 8: step messages naming files outside the cache ---------------------------------------


def test_disk_steps_sent_directly_take_the_base_from_the_cache_never_from_the_message(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given an image in the cache, and a host file outside the cache with a .json beside it
    # (as a snapshot has its description)
    name, _ = serve(image_server)
    image_id = unique("img")
    url = image_server.url(name)
    cached = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(request_for(url, image_id)), timeout=60
    )
    entry = Path(cached.base.path)
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"host secret\n" * (MiB // 12))
    secret.with_name(secret.name + ".json").write_text("{}")
    hostile = cached.base.model_dump(mode="json") | {"path": str(secret)}

    # When copy_raw_disk is sent directly with the host file as the base's path
    request = request_for(url, image_id, backend="raw")
    raw = PreparedDisk.model_validate(
        send_step(
            clean_cluster, "imgprep.copy_raw_disk", hostile, request.model_dump(mode="json")
        ).get(timeout=60)
    )
    # Then the disk is a copy of the cache entry, not of the host file
    assert raw.base.path == str(entry)
    size = entry.stat().st_size
    assert sha256(Path(raw.disk.path), size) == sha256(entry)
    assert sha256(Path(raw.disk.path), secret.stat().st_size) != sha256(secret)

    # When create_overlay is sent the same way
    request = request_for(url, image_id)
    overlay = PreparedDisk.model_validate(
        send_step(
            clean_cluster, "imgprep.create_overlay", hostile, request.model_dump(mode="json")
        ).get(timeout=60)
    )
    # Then the overlay's backing file is the cache entry
    info = subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", "--output=json", overlay.disk.path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f'"backing-filename": "{entry}"' in info
    assert str(secret) not in info

    # And a base that is not the request's image, or not in the cache, is refused
    other = request_for(url, unique("img"))
    with pytest.raises(InvalidRequest, match="is not the entry of image"):
        send_step(
            clean_cluster, "imgprep.create_overlay", hostile, other.model_dump(mode="json")
        ).get(timeout=60)
    missing = cached.base.model_dump(mode="json") | {"key": cache_key(other.image.image_id)}
    with pytest.raises(BaseImageMissing, match="is not in the cache"):
        send_step(
            clean_cluster, "imgprep.create_overlay", missing, other.model_dump(mode="json")
        ).get(timeout=60)
    for disk in (raw, overlay):
        clean_cluster.client.send(
            "imgprep.delete_disk", {"instance_id": disk.disk.instance_id}
        ).get(timeout=60)


def test_convert_sent_directly_reads_a_disk_only_in_its_recorded_format(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given a raw disk whose guest wrote a qcow2 header naming a host file as backing file
    name, _ = serve(image_server)
    prepared = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(
            request_for(image_server.url(name), unique("img"), backend="raw")
        ),
        timeout=60,
    )
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"host secret\n" * (MiB // 12))
    guest_writes(Path(prepared.disk.path), qcow2_header(tmp_path, secret))
    target = clean_cluster.settings.snapshots_dir / f"{unique('leak')}.raw"

    # When imgprep.convert is sent directly, claiming the disk is a qcow2
    job = ConvertJob(
        source=prepared.disk.path, source_format="qcow2", target=str(target), target_format="raw"
    )
    result = send_step(clean_cluster, "imgprep.convert", job.model_dump(mode="json"))

    # Then it is refused: the disk is recorded as raw, and nothing was written
    with pytest.raises(InvalidRequest, match="recorded as a raw disk"):
        result.get(timeout=60)
    assert not target.exists()
    clean_cluster.client.send(
        "imgprep.delete_disk", {"instance_id": prepared.disk.instance_id}
    ).get(timeout=60)


# -- defect 9: guest bytes and eviction -----------------------------------------------------------


@pytest.mark.parametrize("written", ["garbage", "backing file"])
def test_what_a_guest_writes_into_a_raw_disk_does_not_change_eviction(
    cluster_factory: ClusterFactory, image_server: ImageServer, tmp_path: Path, written: str
) -> None:
    # Given an image cached for a raw disk only (a raw copy does not use its base)
    cluster = cluster_factory("guest-bytes")
    cluster.add_worker("gb")
    name, _ = serve(image_server)
    prepared = cluster.client.wait_prepared(
        cluster.client.prepare_disk(
            request_for(image_server.url(name), unique("img"), backend="raw")
        ),
        timeout=60,
    )
    base = Path(prepared.base.path)
    # and a guest that wrote the qcow2 magic and garbage, or a valid qcow2 header naming the
    # base as its backing file, at the start of its raw disk
    data = QCOW2_MAGIC + os.urandom(508) if written == "garbage" else qcow2_header(tmp_path, base)
    guest_writes(Path(prepared.disk.path), data)

    # When the cache manager looks (a dry run, any age)
    result = cluster.client.send(
        "imgprep.evict_cache",
        {"dry_run": True, "remove_unused_original_minimum_age_seconds": 0},
    )
    report = CacheEvictionReport.model_validate(result.get(timeout=60))

    # Then the base is unused and would be removed: the guest's bytes count for nothing
    assert [e.key for e in report.evicted] == [base.name]
    assert report.kept_in_use == []
    cluster.assert_clean()


# -- defect 11: conflicting prepares --------------------------------------------------------------


def test_a_conflicting_prepare_leaves_no_reference_to_its_base(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a disk made from image X
    name_x, _ = serve(image_server)
    name_y, _ = serve(image_server)
    image_x, image_y = unique("img"), unique("img")
    instance = unique("vm")
    client = clean_cluster.client
    client.wait_prepared(
        client.prepare_disk(request_for(image_server.url(name_x), image_x, instance=instance)),
        timeout=60,
    )
    holder = f"{clean_cluster.settings.host_id}/{instance}/disk"
    assert holders(clean_cluster, image_x) == [holder]

    # When the same disk is asked for from image Y
    with pytest.raises(DiskConflict):
        client.wait_prepared(
            client.prepare_disk(request_for(image_server.url(name_y), image_y, instance=instance)),
            timeout=60,
        )
    # Then nothing references Y (neither the disk nor the canvas), X keeps the disk
    assert holders(clean_cluster, image_y) == []
    assert holders(clean_cluster, image_x) == [holder]

    # And a conflicting request on the same base (another size) keeps the disk's reference
    with pytest.raises(DiskConflict):
        client.wait_prepared(
            client.prepare_disk(
                request_for(image_server.url(name_x), image_x, instance=instance, size=32 * MiB)
            ),
            timeout=60,
        )
    assert holders(clean_cluster, image_x) == [holder]
    client.send("imgprep.delete_disk", {"instance_id": instance}).get(timeout=60)
    assert holders(clean_cluster, image_x) == []
