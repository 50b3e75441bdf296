"""prepare_disk end to end on real parts: redis-server, two worker processes, qemu-img, HTTP."""

from __future__ import annotations

import hashlib
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from domain.cache.directory import cache_key
from domain.core.errors import ChecksumMismatch, DiskTooSmall, InvalidRequest
from domain.core.journal import StepRecord
from domain.core.models import DiskSpec, ImageSource, PreparedDisk, PrepareRequest
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer

MiB = 2**20


def qemu_info(path: str) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", "--force-share", "--output=json", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out))


def serve_raw(image_server: ImageServer, size: int = 16 * MiB) -> tuple[str, str]:
    """A raw image under a fresh name in the server's directory: (name, sha256 hex)."""
    name = unique("image") + ".raw"
    path = write_raw_image(
        image_server.root / name, size=size, data=hashlib.sha256(name.encode()).digest() * 4096
    )
    return name, hashlib.sha256(path.read_bytes()).hexdigest()


def request_for(
    image_server: ImageServer,
    name: str,
    *,
    image_id: str,
    instance: str,
    size: int = 64 * MiB,
    checksum: str | None = None,
) -> PrepareRequest:
    return PrepareRequest(
        image=ImageSource(url=image_server.url(name), image_id=image_id, checksum=checksum),
        disk=DiskSpec(instance_id=instance, size_bytes=size),
    )


def test_eight_concurrent_prepares_download_once(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given an uncached image served slowly enough that all requests overlap the download
    name, digest = serve_raw(image_server, size=24 * MiB)
    image_server.bytes_per_second = 16 * MiB
    image_id = unique("img")
    requests = [
        request_for(
            image_server,
            name,
            image_id=image_id,
            instance=unique("vm"),
            checksum=f"sha256:{digest}",
        )
        for _ in range(8)
    ]

    # When eight prepare_disk requests are sent at once to two worker processes
    results = [clean_cluster.client.prepare_disk(r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        prepared = list(
            pool.map(lambda r: clean_cluster.client.wait_prepared(r, timeout=120), results)
        )

    # Then the image was fetched once, and each overlay is backed by the cached base
    assert image_server.gets(name) == 1
    base = clean_cluster.settings.cache_dir / cache_key(image_id)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    workers_seen: set[str] = set()
    for request, disk in zip(requests, prepared, strict=True):
        info = qemu_info(disk.disk.path)
        assert info["backing-filename"] == str(base)
        assert info["backing-filename-format"] == "raw"
        assert info["virtual-size"] == request.disk.size_bytes
        assert disk.disk.path == str(
            clean_cluster.settings.instances_dir / request.disk.instance_id / "disk"
        )
        view = clean_cluster.journal.read(results[requests.index(request)].id)
        assert view is not None
        workers_seen.update(rec.worker for rec in view.records.values() if rec.worker is not None)
    # both worker processes took part
    assert len(workers_seen) == 2


def test_same_request_twice_gives_same_result_without_second_download(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given one request
    name, digest = serve_raw(image_server)
    request = request_for(image_server, name, image_id=unique("img"), instance=unique("vm"))

    # When it is sent twice at once, and then a third time after both finished
    first, second = (
        clean_cluster.client.prepare_disk(request),
        clean_cluster.client.prepare_disk(request),
    )
    one = clean_cluster.client.wait_prepared(first, timeout=60)
    two = clean_cluster.client.wait_prepared(second, timeout=60)
    three = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(request), timeout=60
    )

    # Then every caller gets the same result, and the image was downloaded once
    assert one == two == three
    assert image_server.gets(name) == 1
    assert one.base.source_sha256 == digest


def test_checksum_mismatch_fails_and_leaves_nothing(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a request whose checksum does not match the served bytes
    name, _ = serve_raw(image_server)
    image_id = unique("img")
    request = request_for(
        image_server, name, image_id=image_id, instance=unique("vm"), checksum="sha256:" + "0" * 64
    )

    # When it runs
    result = clean_cluster.client.prepare_disk(request)
    with pytest.raises(ChecksumMismatch, match="expected sha256:0000") as failure:
        clean_cluster.client.wait_prepared(result, timeout=60)

    # Then the error names the checksum, nothing is cached and no overlay exists
    assert "has sha256:" in str(failure.value)
    key = cache_key(image_id)
    assert not list(clean_cluster.settings.cache_dir.glob(f"{key}*"))
    assert not (clean_cluster.settings.instances_dir / request.disk.instance_id / "disk").exists()
    assert image_server.gets(name) == 1  # permanent: not retried


def test_base_larger_than_disk_is_refused_without_retry(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given an image of 16 MiB and a disk of 8 MiB
    name, _ = serve_raw(image_server, size=16 * MiB)
    request = request_for(
        image_server, name, image_id=unique("img"), instance=unique("vm"), size=8 * MiB
    )

    # When it runs
    result = clean_cluster.client.prepare_disk(request)
    with pytest.raises(DiskTooSmall, match="larger than the requested disk"):
        clean_cluster.client.wait_prepared(result, timeout=60)

    # Then the overlay step ran once, failed (the journal records it just after the result is
    # stored), and left no disk
    def failed_record() -> StepRecord | None:
        view = clean_cluster.journal.read(result.id)
        record = view.records.get(result.id) if view else None
        return record if record is not None and record.state == "FAILURE" else None

    overlay = wait_for(failed_record, timeout=10, what="the journal's failure record")
    assert overlay.attempts == 1 and overlay.finishes == 1
    assert "DiskTooSmall" in (overlay.error or "")
    assert not (clean_cluster.settings.instances_dir / request.disk.instance_id / "disk").exists()


def test_invalid_request_fails_fast_with_its_field(clean_cluster: Cluster) -> None:
    # Given a payload a control plane could send, with a path in the instance id
    payload = {
        "image": {"url": "http://127.0.0.1:1/x", "image_id": "x"},
        "disk": {"instance_id": "../etc", "size_bytes": 1024},
    }
    # When it is sent as the one JSON argument of imgprep.prepare_disk
    result = clean_cluster.client.send("imgprep.prepare_disk", payload)
    # Then it fails at once with InvalidRequest naming the field
    with pytest.raises(InvalidRequest, match=r"disk\.instance_id"):
        result.get(timeout=30)


def test_existing_overlay_with_other_backing_is_a_conflict(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    from domain.core.errors import DiskConflict

    # Given an instance disk prepared from one image
    instance = unique("vm")
    name_a, _ = serve_raw(image_server)
    name_b, _ = serve_raw(image_server)
    first = request_for(image_server, name_a, image_id=unique("img"), instance=instance)
    clean_cluster.client.wait_prepared(clean_cluster.client.prepare_disk(first), timeout=60)

    # When the same instance disk is asked for from another image
    second = request_for(image_server, name_b, image_id=unique("img"), instance=instance)
    with pytest.raises(DiskConflict, match="already exists"):
        clean_cluster.client.wait_prepared(clean_cluster.client.prepare_disk(second), timeout=60)

    # Then the first disk is untouched
    assert qemu_info(first_disk_path(clean_cluster, instance))["backing-filename"] == str(
        clean_cluster.settings.cache_dir / cache_key(first.image.image_id)
    )


def first_disk_path(cluster: Cluster, instance: str) -> str:
    return str(cluster.settings.instances_dir / instance / "disk")


def test_result_is_plain_json_for_any_client(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a prepared disk
    name, _ = serve_raw(image_server)
    request = request_for(image_server, name, image_id=unique("img"), instance=unique("vm"))
    result = clean_cluster.client.prepare_disk(request)
    clean_cluster.client.wait_prepared(result, timeout=60)

    # When another client reads the result backend's raw record for the caller's task id
    raw = clean_cluster.redis.get(f"celery-task-meta-{result.id}")

    # Then it is JSON that validates as the documented result model
    assert raw is not None
    record = json.loads(raw)
    assert record["status"] == "SUCCESS"
    assert (
        PreparedDisk.model_validate(record["result"]).disk.instance_id == request.disk.instance_id
    )


def test_sources_outside_file_roots_are_refused(clean_cluster: Cluster, tmp_path: Path) -> None:
    from domain.core.errors import SourceNotAllowed

    outside = write_raw_image(tmp_path / "outside.raw", size=MiB, data=b"x" * 512)
    request = PrepareRequest(
        image=ImageSource(url=f"file://{outside}", image_id=unique("img")),
        disk=DiskSpec(instance_id=unique("vm"), size_bytes=8 * MiB),
    )
    with pytest.raises(SourceNotAllowed, match="outside the allowed file roots"):
        clean_cluster.client.wait_prepared(clean_cluster.client.prepare_disk(request), timeout=60)


def test_a_linked_callback_still_runs_after_the_canvas(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    from celery import signature

    # Given a Python caller that links a callback to its prepare_disk message
    name, _ = serve_raw(image_server)
    request = request_for(image_server, name, image_id=unique("img"), instance=unique("vm"))
    callback = signature("imgprep.ping", immutable=True, queue="imgprep")
    callback_id = callback.freeze().id

    # When the operation runs (Task.replace carries the link over to the canvas's last step)
    result = clean_cluster.app.send_task(
        "imgprep.prepare_disk",
        args=[request.model_dump(mode="json")],
        queue="imgprep",
        link=callback,
    )
    prepared = clean_cluster.client.wait_prepared(result, timeout=60)

    # Then the caller gets the disk, and its callback ran after the last step
    assert prepared.disk.instance_id == request.disk.instance_id
    assert clean_cluster.app.AsyncResult(callback_id).get(timeout=30)["pid"] > 0
