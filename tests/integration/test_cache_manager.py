"""The image cache manager on real parts: two hosts' workers sharing one cache directory and one
Redis, real qemu-img overlays, real files aged by their mtime. In-use bases are never removed,
even when only another host's disk uses them; unused ones go when aged or over the size cap;
fetches racing evictions never lose an entry that is in use."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from domain.cache.directory import cache_key
from domain.core.models import CacheEvictionReport, DeletedDisk, PreparedDisk
from harness.redis_server import RedisServer
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, make_cluster, unique
from worker.app.routing import host_queue
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port
from worker.stores.redis_references import REFS_PREFIX
from worker.stores.replies import text

MiB = 2**20
DAY = 86400.0
REPO = Path(__file__).resolve().parents[2]


@dataclass
class TwoHosts:
    """A cluster whose two workers are two compute hosts sharing the cache directory."""

    cluster: Cluster
    here: str
    there: str
    there_instances: Path

    def send(self, task: str, payload: dict[str, Any], queue: str = "imgprep") -> Any:
        return self.cluster.app.send_task(task, args=[payload], queue=queue)

    def prepare(self, image_server: ImageServer, name: str, image_id: str, host: str) -> str:
        request = {
            "image": {"url": image_server.url(name), "image_id": image_id},
            "disk": {"instance_id": unique("vm"), "size_bytes": 64 * MiB},
            "host": host,
        }
        result = self.cluster.client.send("imgprep.prepare_disk", request)
        return PreparedDisk.model_validate(result.get(timeout=120)).disk.instance_id

    def delete(self, instance_id: str, host: str) -> DeletedDisk:
        result = self.send("imgprep.delete_disk", {"instance_id": instance_id, "host": host})
        return DeletedDisk.model_validate(result.get(timeout=60))

    def evict(self, on_host: str, **request: Any) -> CacheEvictionReport:
        """One cache manager pass run by the worker of `on_host`."""
        result = self.send("imgprep.evict_cache", request, queue=host_queue(on_host))
        return CacheEvictionReport.model_validate(result.get(timeout=120))

    def entry(self, image_id: str) -> Path:
        return self.cluster.settings.cache_dir / cache_key(image_id)

    def holders(self, image_id: str) -> list[str]:
        raw = self.cluster.redis.hkeys(REFS_PREFIX + cache_key(image_id))
        return sorted(text(h) for h in raw)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    root = tmp_path_factory.mktemp("cache-manager")
    (root / "other-instances").mkdir()
    server = RedisServer(root / "redis", free_port()).start()
    cluster = make_cluster(root, server)
    there = f"other-{uuid.uuid4().hex[:6]}"
    try:
        cluster.workers.append(cluster.start_worker("here"))
        cluster.workers.append(
            cluster.start_worker(
                "there",
                env={
                    "IMGPREP_HOST_ID": there,
                    "IMGPREP_INSTANCES_DIR": str(root / "other-instances"),
                },
            )
        )
        yield TwoHosts(
            cluster=cluster,
            here=cluster.settings.host_id,
            there=there,
            there_instances=root / "other-instances",
        )
    finally:
        for worker in cluster.workers:
            worker.stop()
        server.stop()


@pytest.fixture
def clean_hosts(hosts: TwoHosts, image_server: ImageServer) -> Iterator[TwoHosts]:
    image_server.bytes_per_second = None
    yield hosts
    hosts.cluster.assert_clean()


def serve(image_server: ImageServer, size: int = 4 * MiB) -> str:
    name = unique("cm") + ".raw"
    write_raw_image(image_server.root / name, size=size, data=os.urandom(256 * 1024))
    return name


def age(path: Path, seconds: float) -> None:
    """Make the entry's last use `seconds` ago."""
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_base_used_only_by_another_hosts_disk_is_never_removed(
    clean_hosts: TwoHosts, image_server: ImageServer
) -> None:
    # Given a base whose only disk lives on the other host, unused for two days
    image_id = unique("img")
    instance = clean_hosts.prepare(image_server, serve(image_server), image_id, clean_hosts.there)
    base = clean_hosts.entry(image_id)
    age(base, 2 * DAY)
    assert (clean_hosts.there_instances / instance / "disk").is_file()

    # When this host's cache manager runs, whose own disks do not use the base
    report = clean_hosts.evict(clean_hosts.here, remove_unused_original_minimum_age_seconds=0)

    # Then the base stays: the other host's reference keeps it in use
    assert base.name in report.kept_in_use
    assert base.name not in [e.key for e in report.evicted]
    assert base.is_file() and base.with_name(base.name + ".json").is_file()
    assert clean_hosts.holders(image_id) == [f"{clean_hosts.there}/{instance}/disk"]
    # and `imgprep cache list` shows it with its reference
    listed = clean_hosts.cluster.cli("cache", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r["key"] == base.name)
    assert row["image_id"] == image_id and row["references"] == 1
    assert row["format"] == "raw" and row["virtual_size"] == 4 * MiB
    assert 0 < row["size_on_disk"] <= 4 * MiB
    text = clean_hosts.cluster.cli("cache", "list")
    assert base.name in text.stdout and image_id in text.stdout

    # When the disk is deleted on its host
    deleted = clean_hosts.delete(instance, clean_hosts.there)

    # Then its reference is gone and the next pass removes the aged base, record first
    assert deleted.existed and deleted.released_bases == [base.name]
    assert not (clean_hosts.there_instances / instance).exists()
    assert clean_hosts.holders(image_id) == []
    report = clean_hosts.evict(clean_hosts.here)
    assert [(e.key, e.reason) for e in report.evicted] == [(base.name, "unused")]
    assert not base.exists() and not base.with_name(base.name + ".json").exists()
    # and deleting the disk again is not an error
    again = clean_hosts.delete(instance, clean_hosts.there)
    assert not again.existed and again.released_bases == []


def test_local_disk_keeps_its_base_even_when_redis_lost_the_reference(
    clean_hosts: TwoHosts, image_server: ImageServer
) -> None:
    # Given a disk on this host whose reference Redis no longer has, and an aged base
    image_id = unique("img")
    instance = clean_hosts.prepare(image_server, serve(image_server), image_id, clean_hosts.here)
    clean_hosts.cluster.redis.delete(REFS_PREFIX + cache_key(image_id))
    base = clean_hosts.entry(image_id)
    age(base, 2 * DAY)

    # When this host's cache manager runs
    report = clean_hosts.evict(clean_hosts.here, remove_unused_original_minimum_age_seconds=0)

    # Then qemu-img info of the local disk shows the base as its backing file: it stays
    assert base.name in report.kept_in_use
    assert base.is_file()
    clean_hosts.delete(instance, clean_hosts.here)
    assert clean_hosts.evict(clean_hosts.here).evicted[0].key == base.name


def test_aged_unused_bases_go_and_recent_ones_stay(
    clean_hosts: TwoHosts, image_server: ImageServer
) -> None:
    # Given two bases no disk uses any more, one unused for two days and one for an hour
    old_id, recent_id = unique("old"), unique("recent")
    for image_id in (old_id, recent_id):
        instance = clean_hosts.prepare(
            image_server, serve(image_server), image_id, clean_hosts.here
        )
        clean_hosts.delete(instance, clean_hosts.here)
    age(clean_hosts.entry(old_id), 2 * DAY)
    age(clean_hosts.entry(recent_id), 3600)

    # When a dry run, then a real pass, run with the default minimum age (one day)
    dry = clean_hosts.evict(clean_hosts.here, dry_run=True)
    still_there = clean_hosts.entry(old_id).is_file()
    report = clean_hosts.evict(clean_hosts.here)

    # Then the dry run only reported the old one, and the real pass removed it alone
    assert [e.key for e in dry.evicted] == [cache_key(old_id)] and dry.dry_run
    assert still_there
    assert [e.key for e in report.evicted] == [cache_key(old_id)]
    assert report.bytes_after == report.bytes_before - report.evicted[0].size_on_disk
    assert not clean_hosts.entry(old_id).exists()
    assert clean_hosts.entry(recent_id).is_file()
    clean_hosts.evict(clean_hosts.here, remove_unused_original_minimum_age_seconds=0)


def test_size_cap_removes_least_recently_used_unused_bases_first(
    clean_hosts: TwoHosts, image_server: ImageServer
) -> None:
    # Given three unused bases last used 3, 2 and 1 hours ago, and an in-use one 5 hours ago
    ids = [unique("lru") for _ in range(3)]
    for image_id in ids:
        instance = clean_hosts.prepare(
            image_server, serve(image_server), image_id, clean_hosts.here
        )
        clean_hosts.delete(instance, clean_hosts.here)
    in_use_id = unique("used")
    in_use = clean_hosts.prepare(image_server, serve(image_server), in_use_id, clean_hosts.here)
    for image_id, hours in zip([*ids, in_use_id], (3, 2, 1, 5), strict=True):
        age(clean_hosts.entry(image_id), hours * 3600)
    sizes = {i: clean_hosts.entry(i).stat().st_blocks * 512 for i in [*ids, in_use_id]}
    total = clean_hosts.evict(clean_hosts.here, dry_run=True).bytes_before
    cap = total - sizes[ids[0]] - sizes[ids[1]]

    # When the cache manager runs with a cap that needs two bases gone
    report = clean_hosts.evict(clean_hosts.here, max_bytes=cap)

    # Then the two least recently used unused bases went, over the cap; the rest stayed
    assert [(e.key, e.reason) for e in report.evicted] == [
        (cache_key(ids[0]), "over_size_cap"),
        (cache_key(ids[1]), "over_size_cap"),
    ]
    assert report.bytes_after <= cap
    assert clean_hosts.entry(ids[2]).is_file() and clean_hosts.entry(in_use_id).is_file()
    clean_hosts.delete(in_use, clean_hosts.here)
    clean_hosts.evict(clean_hosts.here, remove_unused_original_minimum_age_seconds=0)


def test_concurrent_fetches_and_evictions_never_lose_an_entry_in_use(
    clean_hosts: TwoHosts, image_server: ImageServer
) -> None:
    # Given a cached base that nothing uses and that is long past the minimum age
    name = serve(image_server, size=8 * MiB)
    image_id = unique("race")
    first = clean_hosts.prepare(image_server, name, image_id, clean_hosts.here)
    clean_hosts.delete(first, clean_hosts.here)
    base = clean_hosts.entry(image_id)

    removals = 0
    for round_number in range(3):
        age(base, 2 * DAY) if base.exists() else None
        # When disks are prepared from it on both hosts while passes that remove every unused
        # base at once (minimum age 0) run on both hosts
        hosts = [clean_hosts.here, clean_hosts.there] * 3
        with ThreadPoolExecutor(12) as pool:
            disks = [
                pool.submit(clean_hosts.prepare, image_server, name, image_id, host)
                for host in hosts
            ]
            passes = [
                pool.submit(clean_hosts.evict, host, remove_unused_original_minimum_age_seconds=0)
                for host in hosts
            ]
            instances = [future.result() for future in disks]
            reports = [future.result() for future in passes]

        # Then every prepare succeeded and every disk's base is there, referenced by it
        assert base.is_file(), f"round {round_number}: the base in use was removed"
        expected = sorted(f"{h}/{i}/disk" for h, i in zip(hosts, instances, strict=True))
        assert clean_hosts.holders(image_id) == expected
        for host, instance in zip(hosts, instances, strict=True):
            root = (
                clean_hosts.there_instances
                if host == clean_hosts.there
                else (clean_hosts.cluster.settings.instances_dir)
            )
            info = json.loads(
                subprocess.run(
                    [
                        "qemu-img",
                        "info",
                        "-f",
                        "qcow2",
                        "--force-share",
                        "--output=json",
                        str(root / instance / "disk"),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            assert info["backing-filename"] == str(base)
        # and a pass now keeps it, since it is in use
        assert (
            base.name
            in clean_hosts.evict(
                clean_hosts.here, remove_unused_original_minimum_age_seconds=0
            ).kept_in_use
        )
        assert all(r.bytes_after <= r.bytes_before for r in reports)
        removals += sum(base.name in [e.key for e in r.evicted] for r in reports)
        for host, instance in zip(hosts, instances, strict=True):
            clean_hosts.delete(instance, host)

    print(f"\nbase removed {removals} times during the races; {image_server.gets(name)} GETs")
    # And once every disk is deleted, the base goes
    report = clean_hosts.evict(clean_hosts.here, remove_unused_original_minimum_age_seconds=0)
    assert base.name in [e.key for e in report.evicted]
