"""Hostile and broken image sources against real workers: denied networks (checked on the
address each connection uses, redirects included), redirects to other schemes, trickling and
stalled servers. Images are served on 127.0.0.1; 127.0.0.2 is denied in every test cluster
(tests/integration/conftest.py), so nothing is ever sent off this machine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.exceptions import TimeLimitExceeded
from celery.result import AsyncResult

from domain.core.errors import SourceNotAllowed, SourceTooSlow, StepTimedOut
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from harness.machine import lock_keys
from tests.conftest import write_raw_image
from tests.integration.conftest import DENIED_ADDRESS, Cluster, ClusterFactory, unique
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer

MiB = 2**20


def prepare(cluster: Cluster, url: str) -> AsyncResult:
    return cluster.client.prepare_disk(
        PrepareRequest(
            image=ImageSource(url=url, image_id=unique("img")),
            disk=DiskSpec(instance_id=unique("vm"), size_bytes=16 * MiB),
        )
    )


def attempts(cluster: Cluster, result: AsyncResult) -> int:
    view = cluster.journal.read(result.id)
    assert view is not None
    return next(r.attempts for r in view.records.values() if r.name == "imgprep.fetch_to_cache")


@pytest.fixture
def denied_server(tmp_path: Path) -> Iterator[ImageServer]:
    """An image server on the denied address: it must never see a connection."""
    (tmp_path / "denied").mkdir()
    with ImageServer(tmp_path / "denied", host=DENIED_ADDRESS) as server:
        write_raw_image(server.root / "metadata.raw", size=4 * MiB, data=b"credentials")
        yield server


def test_a_denied_address_is_refused_without_a_connection(
    clean_cluster: Cluster, denied_server: ImageServer
) -> None:
    result = prepare(clean_cluster, denied_server.url("metadata.raw"))
    with pytest.raises(SourceNotAllowed, match=rf"resolves to {DENIED_ADDRESS} \(in"):
        clean_cluster.client.wait_prepared(result, timeout=60)
    assert denied_server.connections() == 0
    assert attempts(clean_cluster, result) == 1  # permanent: not retried


def test_a_redirect_to_a_denied_address_is_refused(
    clean_cluster: Cluster, image_server: ImageServer, denied_server: ImageServer
) -> None:
    # Given an allowed server whose image redirects to the denied address
    name = unique("hop") + ".raw"
    image_server.redirect(name, denied_server.url("metadata.raw"))
    # When it is fetched, then the hop is refused and nothing reached the denied server
    result = prepare(clean_cluster, image_server.url(name))
    with pytest.raises(SourceNotAllowed, match=DENIED_ADDRESS):
        clean_cluster.client.wait_prepared(result, timeout=60)
    assert image_server.gets(name) == 1 and denied_server.connections() == 0


def test_a_redirect_to_a_file_url_is_refused_at_once(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a source redirecting to a file inside the roots file:// URLs may read
    secret = clean_cluster.root / "sources" / (unique("host") + ".raw")
    write_raw_image(secret, size=4 * MiB, data=b"host file")
    name = unique("to-file") + ".raw"
    image_server.redirect(name, f"file://{secret}")
    # When it is fetched, then that is a permanent SourceNotAllowed, not a retried error
    result = prepare(clean_cluster, image_server.url(name))
    with pytest.raises(SourceNotAllowed, match="may only lead to http or https"):
        clean_cluster.client.wait_prepared(result, timeout=60)
    assert image_server.gets(name) == 1
    assert attempts(clean_cluster, result) == 1


def test_a_trickling_source_ends_with_the_rate_error(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given workers that want 64 KiB/s over 2 s and retry once, and a source that sends a
    # few bytes, then one byte a second
    cluster = cluster_factory(
        "trickle",
        {
            "IMGPREP_FETCH__MIN_BYTES_PER_SECOND": "65536",
            "IMGPREP_FETCH__RATE_WINDOW_SECONDS": "2",
            "IMGPREP_RETRY__MAX_RETRIES": "1",
        },
    )
    cluster.add_worker("trickle")
    name = unique("trickle") + ".raw"
    write_raw_image(image_server.root / name, size=8 * MiB, data=b"t" * 4096)
    image_server.trickle(name, after=1000, every=1.0)

    # When a disk is prepared from it
    result = prepare(cluster, image_server.url(name))

    # Then both attempts end by the rate, well before any time limit, naming the rate
    with pytest.raises(SourceTooSlow, match=r"bytes/s\), below the minimum of 65536 bytes/s"):
        cluster.client.wait_prepared(result, timeout=60)
    assert image_server.gets(name) == 2
    # and the lock, the temporaries and everything else are gone
    cluster.assert_clean()


def test_the_soft_time_limit_stops_a_blocked_download(
    cluster_factory: ClusterFactory, image_server: ImageServer
) -> None:
    # Given workers whose steps may run 20 s (the soft limit is at 18 s), and a source that
    # sends a few bytes, then one byte every 2 s, which the 60 s rate window does not catch
    cluster = cluster_factory(
        "soft-limit", {"IMGPREP_STEP_TIME_LIMIT": "20", "IMGPREP_LOCK__WAIT_SECONDS": "5"}
    )
    cluster.add_worker("soft-limit")
    name = unique("stuck") + ".raw"
    write_raw_image(image_server.root / name, size=8 * MiB, data=b"s" * 4096)
    image_server.trickle(name, after=1000, every=2.0)

    # When a disk is prepared from it, and the soft limit fires during a blocked read
    result = prepare(cluster, image_server.url(name))
    wait_for(lambda: lock_keys(cluster.redis), timeout=30, what="the fetch to take its lock")

    # Then the caller sees StepTimedOut, never the hard TimeLimitExceeded
    try:
        with pytest.raises(StepTimedOut, match=r"fetch_to_cache ran past its time limit \(20 s\)"):
            cluster.client.wait_prepared(result, timeout=90)
    except TimeLimitExceeded as error:
        pytest.fail(f"the hard time limit killed the step: {error!r}")
    # and the step released its lock and removed its temporary itself (the lease is 6 s: a
    # killed holder's lock would still be there)
    assert lock_keys(cluster.redis) == []
    cluster.assert_clean()
