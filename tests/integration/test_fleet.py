"""Host scope as a fleet on one machine: four host ids, each with its own worker process, its own
cache, instances and state directories and its own peer port on loopback; one Redis; an origin
image server with a bandwidth limit that counts the bytes it sends.

A burst of prepares on every host takes the image once from the origin; a peer killed in the
middle of serving leaves the others to resume elsewhere with whole entries; a peer that serves
wrong bytes is caught by the digest and withdrawn; the cache manager of a host never removes a
base one of its disks uses. Every test ends with the machine clean on every host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.cache.directory import cache_key
from domain.cache.peers import PeerCopy
from domain.cache.precache_models import PrecacheReport
from domain.core.models import CacheEvictionReport, DeletedDisk, PreparedDisk
from tests.integration.conftest import ClusterFactory, unique
from tests.integration.fleet import HOSTS, FakePeer, Fleet, MiB, image_file, make_fleet
from tests.support.waiting import wait_for
from worker.app.routing import host_queue


@pytest.fixture
def fleet(cluster_factory: ClusterFactory, tmp_path: Path) -> Iterator[Fleet]:
    with make_fleet(cluster_factory, tmp_path) as made:
        yield made


def test_burst_on_every_host_takes_the_image_once_from_the_origin(fleet: Fleet) -> None:
    size = 24 * MiB
    name, checksum = image_file(fleet.origin.root, "burst.raw", size, seed=1)
    fleet.origin.bytes_per_second = 12 * MiB  # 2 s from the origin
    image_id = unique("img")
    results = [fleet.prepare(name, image_id, host) for host in HOSTS for _ in range(2)]
    prepared = [PreparedDisk.model_validate(r.get(timeout=180)) for r in results]

    assert fleet.origin.bytes_sent <= 1.05 * size, fleet.origin.bytes_sent
    assert sorted({p.disk.host for p in prepared}) == sorted(HOSTS)
    for host in HOSTS:
        assert f"sha256:{fleet.entry_sha256(host, image_id)}" == checksum
        assert all(
            Path(p.disk.backing_file or "").parent == fleet.hosts[host].root / "cache"
            for p in prepared
            if p.disk.host == host
        )
    copies = fleet.registry.copies(cache_key(image_id))
    assert sorted(c.host for c in copies if c.complete) == sorted(HOSTS)
    for p in prepared:
        deleted = fleet.send(
            "imgprep.delete_disk",
            {"instance_id": p.disk.instance_id, "host": p.disk.host},
            p.disk.host,
        )
        DeletedDisk.model_validate(deleted.get(timeout=60))
    fleet.assert_clean()


def test_a_peer_killed_mid_transfer_leaves_the_others_whole_entries(fleet: Fleet) -> None:
    size = 32 * MiB
    name, checksum = image_file(fleet.origin.root, "killed.raw", size, seed=2)
    fleet.origin.bytes_per_second = 4 * MiB  # 8 s from the origin
    image_id = unique("img")
    key = cache_key(image_id)
    first = fleet.prepare(name, image_id, "h1", checksum)

    def h1_has(bytes_: int) -> bool:
        copy = fleet.registry.copy(key, "h1")
        return copy is not None and copy.size >= bytes_

    wait_for(lambda: h1_has(4 * MiB), timeout=60, what="h1 downloading from the origin")
    others = [fleet.prepare(name, image_id, host, checksum) for host in ("h2", "h3", "h4")]

    def streaming_from_h1() -> bool:
        copies = {c.host: c for c in fleet.registry.copies(key)}
        return any(c.upstream == "h1" and c.size >= 8 * MiB for c in copies.values())

    wait_for(streaming_from_h1, timeout=60, what="a host with 8 MiB streamed from h1")
    h1 = fleet.hosts["h1"]
    assert h1.worker is not None
    h1_copy = fleet.registry.copy(key, "h1")
    assert h1_copy is not None
    h1.worker.kill()  # its peer server and its download die with it

    for result in others:
        PreparedDisk.model_validate(result.get(timeout=180))
    for host in ("h2", "h3", "h4"):
        assert f"sha256:{fleet.entry_sha256(host, image_id)}" == checksum
    # the origin sent h1's part once and the rest once: the host that took over resumed from
    # the byte where its transfer from h1 stopped (8 MiB or more), not from the first byte
    # (which would make it h1's part plus the whole image again)
    assert fleet.origin.bytes_sent < size + h1_copy.size, (fleet.origin.bytes_sent, h1_copy)

    # h1 comes back: its interrupted prepare ends (from a peer), its temporaries are removed
    fleet.start(h1)
    PreparedDisk.model_validate(first.get(timeout=180))
    assert f"sha256:{fleet.entry_sha256('h1', image_id)}" == checksum
    fleet.assert_clean()


def test_a_peer_serving_wrong_bytes_is_caught_and_avoided(fleet: Fleet) -> None:
    size = 8 * MiB
    name, checksum = image_file(fleet.origin.root, "lied.raw", size, seed=3)
    image_id = unique("img")
    key = cache_key(image_id)
    PreparedDisk.model_validate(fleet.prepare(name, image_id, "h1").get(timeout=120))
    liar = FakePeer()
    try:
        # only the liar claims the complete entry (h1's copy is withdrawn)
        fleet.registry.withdraw(key, "h1")
        fleet.registry.announce(key, PeerCopy("liar", liar.url, "entry", True, size, size))
        PreparedDisk.model_validate(fleet.prepare(name, image_id, "h2").get(timeout=120))
        assert liar.requests >= 1  # it was asked, and caught
        assert f"sha256:{fleet.entry_sha256('h2', image_id)}" == checksum
        assert fleet.registry.copy(key, "liar") is None  # withdrawn: nobody asks it again
        asked = liar.requests
        PreparedDisk.model_validate(fleet.prepare(name, image_id, "h3").get(timeout=120))
        assert liar.requests == asked
        assert f"sha256:{fleet.entry_sha256('h3', image_id)}" == checksum
    finally:
        liar.stop()
    fleet.assert_clean()


def test_host_cache_manager_keeps_a_base_a_local_disk_uses(fleet: Fleet) -> None:
    name, _ = image_file(fleet.origin.root, "evict.raw", 4 * MiB, seed=4)
    image_id = unique("img")
    key = cache_key(image_id)
    on_h1 = PreparedDisk.model_validate(fleet.prepare(name, image_id, "h1").get(timeout=120))
    on_h2 = PreparedDisk.model_validate(fleet.prepare(name, image_id, "h2").get(timeout=120))
    deleted = fleet.send(
        "imgprep.delete_disk", {"instance_id": on_h2.disk.instance_id, "host": "h2"}, "h2"
    )
    DeletedDisk.model_validate(deleted.get(timeout=60))
    # h1's references are dropped too: only its disk, read with qemu-img, says the base is used
    fleet.cluster.redis.delete(f"imgprep:refs:h1/{key}")

    def evict(host: str) -> CacheEvictionReport:
        result = fleet.send(
            "imgprep.evict_cache", {"remove_unused_original_minimum_age_seconds": 0}, host
        )
        return CacheEvictionReport.model_validate(result.get(timeout=120))

    assert evict("h1").evicted == []
    assert fleet.hosts["h1"].cache.lookup(key) is not None
    assert [e.key for e in evict("h2").evicted] == [key]
    assert fleet.hosts["h2"].cache.lookup(key) is None
    deleted = fleet.send(
        "imgprep.delete_disk", {"instance_id": on_h1.disk.instance_id, "host": "h1"}, "h1"
    )
    DeletedDisk.model_validate(deleted.get(timeout=60))
    fleet.assert_clean()


def test_precache_fills_every_live_host_once_from_the_origin(fleet: Fleet) -> None:
    size = 16 * MiB
    name, checksum = image_file(fleet.origin.root, "pre.raw", size, seed=5)
    fleet.origin.bytes_per_second = 16 * MiB
    image_id = unique("img")
    image = {"url": fleet.origin.url(name), "image_id": image_id, "checksum": checksum}
    result = fleet.cluster.client.send("imgprep.precache", {"images": [image]})
    report = PrecacheReport.model_validate(result.get(timeout=180))
    assert [(r.host, r.outcome) for r in report.results] == [(h, "cached") for h in HOSTS]
    assert fleet.origin.bytes_sent <= 1.05 * size
    for host in HOSTS:
        assert f"sha256:{fleet.entry_sha256(host, image_id)}" == checksum

    status = fleet.cluster.cli("status", result.id)
    assert status.returncode == 0, status.stderr
    for host in HOSTS:
        assert f"precache_host@{host}" in status.stdout

    again = fleet.cluster.client.send(
        "imgprep.precache", {"images": [image], "hosts": ["h2", "gone"]}
    )
    report = PrecacheReport.model_validate(again.get(timeout=120))
    outcomes = {(r.host, r.outcome, r.error_class) for r in report.results}
    assert outcomes == {("h2", "already_cached", None), ("gone", "failed", "HostUnavailable")}

    # the command: a line per host's step while it runs (no terminal here), then the outcomes
    other = unique("img")
    shown = fleet.cluster.cli(
        "precache", fleet.origin.url(name), "--image-id", other, "--hosts", "h1,h3", "--wait"
    )
    assert shown.returncode == 0, shown.stderr
    assert "precache_host@h1" in shown.stderr and "precache_host@h3" in shown.stderr
    lines = sorted(line.split() for line in shown.stdout.splitlines() if other in line)
    assert lines == [["h1", other, "cached"], ["h3", other, "cached"]]
    fleet.assert_clean()


# Short enough for a test, in the same proportions as the defaults (10 s, 30 s, 300 s), with
# room for heartbeats delayed on a loaded machine.
ABANDON_AFTER = 16.0
FAST_HOSTS = {
    "IMGPREP_HOSTS__HEARTBEAT_SECONDS": "0.5",
    "IMGPREP_HOSTS__SILENT_AFTER_SECONDS": "8",
    "IMGPREP_HOSTS__ABANDON_AFTER_SECONDS": str(int(ABANDON_AFTER)),
}


def test_a_precache_ends_with_a_report_when_hosts_die_before_and_during_their_steps(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    with make_fleet(cluster_factory, tmp_path, FAST_HOSTS) as fleet:
        # Given an image that takes a while (8 s from the origin), and h3's only worker
        # SIGKILLed a moment before a precache on every host is sent (h3 was heard from just
        # now: its step is sent to its queue, where nobody will take it)
        size = 32 * MiB
        name, checksum = image_file(fleet.origin.root, "dies.raw", size, seed=6)
        fleet.origin.bytes_per_second = 4 * MiB
        image_id = unique("img")
        key = cache_key(image_id)
        image = {"url": fleet.origin.url(name), "image_id": image_id, "checksum": checksum}
        h3, h4 = fleet.hosts["h3"], fleet.hosts["h4"]
        assert h3.worker is not None and h4.worker is not None
        h3.worker.kill()
        result = fleet.cluster.client.send("imgprep.precache", {"images": [image]})
        wait_for(
            lambda: fleet.cluster.redis.llen(host_queue("h3")) == 1,
            timeout=30,
            what="h3's precache step to wait in its queue",
        )

        # When h4's only worker is SIGKILLed while its step is writing the image
        def h4_writing() -> bool:
            copy = fleet.registry.copy(key, "h4")
            return copy is not None and not copy.complete and copy.size >= 2 * MiB

        wait_for(h4_writing, timeout=120, what="h4's precache step to be writing the image")
        h4.worker.kill()

        # Then the caller's id ends, within the abandon bound, with a report: the live hosts
        # cached the image, h3 and h4 failed with HostUnavailable naming each and its queue
        report = PrecacheReport.model_validate(result.get(timeout=ABANDON_AFTER + 120))
        outcomes = {r.host: r for r in report.results}
        assert sorted(outcomes) == sorted(HOSTS)
        assert [outcomes[h].outcome for h in ("h1", "h2")] == ["cached"] * 2
        for host in ("h3", "h4"):
            failed = outcomes[host]
            assert (failed.outcome, failed.error_class) == ("failed", "HostUnavailable")
            assert f"host {host} has had no live" in (failed.error_message or "")
            assert f"{host_queue(host)} was abandoned" in (failed.error_message or "")
            assert fleet.cluster.redis.llen(host_queue(host)) == 0
        for host in ("h1", "h2"):
            assert f"sha256:{fleet.entry_sha256(host, image_id)}" == checksum
        assert fleet.cluster.redis.hlen("unacked") == 0
        status = fleet.cluster.cli("status", result.id)
        assert status.returncode == 0, status.stderr
        steps = {line.split()[1]: line for line in status.stdout.splitlines() if "@h" in line}
        assert steps["precache_host@h1"].split()[2] == "SUCCESS"
        for host in ("h3", "h4"):
            assert steps[f"precache_host@{host}"].split()[2] == "FAILURE"
            assert "HostUnavailable: " in steps[f"precache_host@{host}"]

        # And a precache for the silent host now is reported failed at once, on the command
        # line too (nothing is sent to h4)
        shown = fleet.cluster.cli(
            "precache",
            fleet.origin.url(name),
            "--image-id",
            image_id,
            "--hosts",
            "h1,h4",
            "--wait",
            timeout=60,
        )
        assert shown.returncode == 1, shown.stderr
        lines = {line.split()[0]: line for line in shown.stdout.splitlines() if image_id in line}
        assert lines["h1"].split()[2] == "already_cached"
        assert lines["h4"].split()[2:4] == ["failed", "HostUnavailable:"]
        assert "host h4 has had no live imgprep worker" in lines["h4"]
        assert fleet.cluster.redis.llen(host_queue("h4")) == 0

        # And h3 and h4 back: a precache caches the image there (h4's dead step's temporaries
        # removed)
        fleet.start(h3)
        fleet.start(h4)
        again = fleet.cluster.client.send(
            "imgprep.precache", {"images": [image], "hosts": ["h3", "h4"]}
        )
        report = PrecacheReport.model_validate(again.get(timeout=120))
        assert [(r.host, r.outcome) for r in report.results] == [("h3", "cached"), ("h4", "cached")]
        for host in ("h3", "h4"):
            assert f"sha256:{fleet.entry_sha256(host, image_id)}" == checksum
        fleet.assert_clean()
