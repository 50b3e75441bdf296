"""Reliability on real parts: retries by error class, duplicate deliveries, full disks, Redis
restarts. Every test checks that the machine is clean afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.result import AsyncResult

from domain.cache.directory import cache_key
from domain.core.errors import DiskFull, SourceNotFound
from domain.core.models import DiskSpec, ImageSource, PreparedDisk, PrepareRequest
from tests.conftest import need_root, write_raw_image
from tests.integration.conftest import Cluster, ClusterFactory, unique
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer

MiB = 2**20


def request_for(
    url: str, image_id: str, *, size: int = 128 * MiB, declared: str = "auto"
) -> PrepareRequest:
    return PrepareRequest(
        image=ImageSource(url=url, image_id=image_id, declared_format=declared),  # type: ignore[arg-type]
        disk=DiskSpec(instance_id=unique("vm"), size_bytes=size),
    )


def attempts(cluster: Cluster, result: AsyncResult, step: str) -> int:
    view = cluster.journal.read(result.id)
    assert view is not None
    return next(r.attempts for r in view.records.values() if r.name == f"imgprep.{step}")


def test_http_503_twice_then_success_retries(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a source that answers 503 twice before serving the image
    name = unique("flaky") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"flaky" * 100)
    image_server.fail_next(name, 503, times=2)

    # When a disk is prepared from it
    result = clean_cluster.client.prepare_disk(request_for(image_server.url(name), unique("img")))
    prepared = clean_cluster.client.wait_prepared(result, timeout=60)

    # Then the fetch step retried twice and succeeded on its third attempt
    assert Path(prepared.base.path).is_file()
    assert image_server.gets(name) == 3
    assert attempts(clean_cluster, result, "fetch_to_cache") == 3


def test_http_404_fails_at_once(clean_cluster: Cluster, image_server: ImageServer) -> None:
    # Given a source that does not have the image
    name = unique("missing") + ".raw"
    result = clean_cluster.client.prepare_disk(request_for(image_server.url(name), unique("img")))

    # Then the request fails with SourceNotFound after one attempt
    with pytest.raises(SourceNotFound, match="HTTP 404"):
        clean_cluster.client.wait_prepared(result, timeout=60)
    assert image_server.gets(name) == 1
    assert attempts(clean_cluster, result, "fetch_to_cache") == 1


def test_retries_run_out_with_the_error_class(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given a cluster that retries twice, and a source that keeps answering 503
    cluster = cluster_factory("retries", {"IMGPREP_RETRY__MAX_RETRIES": "2"})
    cluster.add_worker("retry")
    name = unique("down") + ".raw"
    write_raw_image(image_server.root / name, size=MiB, data=b"x")
    image_server.fail_next(name, 503, times=10)

    # When a disk is prepared from it
    result = cluster.client.prepare_disk(request_for(image_server.url(name), unique("img")))

    # Then after three attempts the final failure is the transient class with its message
    from domain.core.errors import SourceUnavailable

    with pytest.raises(SourceUnavailable, match="HTTP 503"):
        cluster.client.wait_prepared(result, timeout=60)
    assert image_server.gets(name) == 3
    cluster.assert_clean()


def test_same_message_delivered_twice_gives_one_result(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given one prepare request
    name = unique("dup") + ".raw"
    write_raw_image(image_server.root / name, size=8 * MiB, data=b"dup" * 1000)
    payload = request_for(image_server.url(name), unique("img")).model_dump(mode="json")
    task_id = unique("op")

    # When the same message (same task id) is delivered twice, as a redelivery would
    for _ in range(2):
        clean_cluster.app.send_task(
            "imgprep.prepare_disk", args=[payload], task_id=task_id, queue="imgprep"
        )
    result = clean_cluster.app.AsyncResult(task_id)
    prepared = clean_cluster.client.wait_prepared(result, timeout=60)

    # Then both deliveries ran their whole canvas: two fetch steps, and the last step (which
    # carries the caller's id) twice ...
    def both_done() -> bool:
        view = clean_cluster.journal.read(task_id)
        if view is None or task_id not in view.records:
            return False
        records = view.records.values()
        fetches = [
            r for r in records if r.name == "imgprep.fetch_to_cache" and r.state == "SUCCESS"
        ]
        last = view.records[task_id]
        return len(fetches) == 2 and last.finishes == 2 and last.state == "SUCCESS"

    wait_for(both_done, timeout=60, what="both deliveries to finish")
    # ... yet the image was fetched once, and the caller's result is one success
    assert image_server.gets(name) == 1
    again = clean_cluster.client.wait_prepared(clean_cluster.app.AsyncResult(task_id), timeout=60)
    assert again == prepared
    assert prepared.disk.instance_id == payload["disk"]["instance_id"]


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the duration of the block."""
    need_root()
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "imgprep-test", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("kind", ["download", "conversion"])
def test_disk_full_is_permanent_and_leaves_nothing(
    cluster_factory: ClusterFactory,
    image_server: ImageServer,
    tmp_path: Path,
    runner: object,
    kind: str,
) -> None:
    # Given a cache directory on a 12 MiB filesystem
    with small_filesystem(tmp_path / "small-cache", "12m") as cache_dir:
        cluster = cluster_factory("full", {"IMGPREP_CACHE_DIR": str(cache_dir)})
        cluster.add_worker("full")
        # and an image too large for it: 16 MiB of incompressible data as raw, or a 10 MiB
        # qcow2 that fits but whose conversion to raw (force_raw) does not fit beside it
        name = unique("full")
        data = os.urandom(10 * MiB) if kind == "conversion" else os.urandom(16 * MiB)
        raw = image_server.root / f"{name}.raw"
        raw.write_bytes(data)
        if kind == "conversion":
            served = image_server.root / f"{name}.qcow2"
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(served)],
                check=True,
            )
        else:
            served = raw
        image_id = unique("img")

        # When a disk is prepared from it
        result = cluster.client.prepare_disk(request_for(image_server.url(served.name), image_id))

        # Then it fails at once with DiskFull naming the filesystem and the size
        with pytest.raises(DiskFull) as failure:
            cluster.client.wait_prepared(result, timeout=60)
        message = str(failure.value)
        assert f"filesystem at {cache_dir}" in message
        assert "needs up to" in message
        assert attempts(cluster, result, "fetch_to_cache") == 1
        # and nothing is left: no entry, no temporary, no lock; the space is free again
        assert sorted(p.name for p in cache_dir.iterdir()) == []
        stat = os.statvfs(cache_dir)
        assert stat.f_bfree * stat.f_frsize > 11 * MiB
        cluster.assert_clean()

        # And once there is room (a smaller image) the cache works on the same filesystem
        small = image_server.root / f"{name}-small.raw"
        write_raw_image(small, size=4 * MiB, data=b"ok" * 100)
        done = cluster.client.wait_prepared(
            cluster.client.prepare_disk(request_for(image_server.url(small.name), unique("img"))),
            timeout=60,
        )
        assert Path(done.base.path).parent == cache_dir
        for worker in cluster.workers:
            worker.stop()
        cluster.workers.clear()


def test_redis_restart_during_a_run(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given a cluster with its own redis-server (AOF on) and two workers
    cluster = cluster_factory("restart")
    cluster.add_worker("r1")
    cluster.add_worker("r2")
    # and an image served slowly enough that the restart lands in the middle of the download
    name = unique("restart") + ".raw"
    source = write_raw_image(image_server.root / name, size=48 * MiB, data=os.urandom(4 * MiB))
    image_server.bytes_per_second = 8 * MiB
    image_id = unique("img")
    requests = [request_for(image_server.url(name), image_id) for _ in range(4)]
    results = [cluster.client.prepare_disk(r) for r in requests]

    # When redis-server restarts while the image downloads
    wait_for(lambda: image_server.gets(name), timeout=30, what="the download to start")
    cluster.redis_server.restart()

    # Then every request finishes, and the cache holds the image once, intact
    def wait(result: AsyncResult) -> PreparedDisk:
        deadline = time.monotonic() + 120
        while True:
            try:
                return cluster.client.wait_prepared(cluster.app.AsyncResult(result.id), timeout=10)
            except Exception:  # a client reconnecting after the restart, as a control plane would
                if time.monotonic() > deadline:
                    raise

    # one result at a time (they run at once on the workers): Celery's result consumer shares
    # one pubsub connection, which threads reconnecting at once after the restart can break
    prepared = [wait(result) for result in results]
    assert {p.base.path for p in prepared} == {
        str(cluster.settings.cache_dir / cache_key(image_id))
    }
    entry = Path(prepared[0].base.path)
    assert (
        hashlib.sha256(entry.read_bytes()).hexdigest()
        == hashlib.sha256(source.read_bytes()).hexdigest()
    )
    assert all(Path(p.disk.path).is_file() for p in prepared)
    cluster.assert_clean()
