"""Steps sent straight to a host's queue, as anyone who can write to the broker can: a request
of the wrong shape, or one that names paths outside the roots, is refused as InvalidRequest
whatever the host holds (issue 19 item 8, issue 25), and nothing is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from domain.core.errors import InvalidRequest
from domain.core.models import (
    CachedImage,
    DiskSpec,
    ImageSource,
    InstanceDisk,
    PreparedDisk,
    PrepareRequest,
)
from domain.formats.snapshot_models import ConvertJob, SnapshotRequest
from domain.guest.context import GuestPartition, MappedDisk
from tests.integration.conftest import Cluster, unique
from worker.app.routing import host_queue


def send_step(cluster: Cluster, step: str, *args: Any) -> AsyncResult:
    """A step message sent straight to this host's queue."""
    return cluster.app.send_task(step, args=list(args), queue=host_queue(cluster.settings.host_id))


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def prepare_request(instance: str) -> dict[str, Any]:
    return PrepareRequest(
        image=ImageSource(url="http://127.0.0.1:9/none.raw", image_id=unique("img")),
        disk=DiskSpec(instance_id=instance, size_bytes=2**20),
    ).model_dump(mode="json")


@pytest.mark.parametrize(
    ("step", "args"),
    [
        ("imgprep.mount_guest", ["junk"]),  # one argument of three
        ("imgprep.mount_guest", [[], {}, "op"]),  # a list where a disk belongs
        ("imgprep.map_partitions", [{}, {}, 7]),  # a number for the operation's id
        ("imgprep.convert", [{"kind": "convert_job"}, "extra"]),  # one argument too many
        ("imgprep.teardown", []),
        ("imgprep.release_devices", [None, "op"]),
        ("imgprep.precache_report", ["not a list", {}]),
        ("imgprep.remove_disk", [{"instance_id": 5}]),  # the request's own field, wrong type
    ],
)
def test_a_step_sent_with_arguments_of_the_wrong_shape_fails_invalid(
    clean_cluster: Cluster, step: str, args: list[Any]
) -> None:
    # When a step is sent directly with arguments that do not fit it
    result = send_step(clean_cluster, step, *args)

    # Then it fails at once with InvalidRequest naming the call, not a TypeError
    with pytest.raises(InvalidRequest, match="invalid"):
        result.get(timeout=60)


def test_a_convert_into_the_cache_is_invalid_whatever_disk_it_names(
    clean_cluster: Cluster,
) -> None:
    # Given an instance disk that does not exist (deleted, or never there)
    settings = clean_cluster.settings
    source = settings.instances_dir / unique("vm") / "disk"
    before = files_under(settings.cache_dir)

    # When imgprep.convert is sent directly to write it into the cache directory
    job = ConvertJob(
        source=str(source),
        source_format="qcow2",
        target=str(settings.cache_dir / unique("planted")),
        target_format="raw",
    )
    result = send_step(clean_cluster, "imgprep.convert", job.model_dump(mode="json"))

    # Then it is refused as invalid (not "there is no disk": the request is wrong whatever
    # the host holds), and nothing is written
    with pytest.raises(InvalidRequest, match="is outside"):
        result.get(timeout=60)
    assert files_under(settings.cache_dir) == before


def test_a_snapshot_to_outside_the_snapshots_directory_is_invalid_for_a_missing_disk(
    clean_cluster: Cluster,
) -> None:
    # Given an instance that does not exist, and a target outside the snapshots directory
    request = SnapshotRequest(
        instance_id=unique("vm"), disk_name="disk", target=str(clean_cluster.root / "outside")
    )

    # When its snapshot_source step is sent directly
    result = send_step(clean_cluster, "imgprep.snapshot_source", request.model_dump(mode="json"))

    # Then the target is refused before the disk is looked for
    with pytest.raises(InvalidRequest, match="outside"):
        result.get(timeout=60)
    assert not (clean_cluster.root / "outside").exists()


def test_a_mount_of_a_view_elsewhere_is_invalid_for_a_missing_disk(clean_cluster: Cluster) -> None:
    # Given a disk that does not exist, and a mapped view that is not its view
    settings = clean_cluster.settings
    instance = unique("vm")
    disk = InstanceDisk(
        host=settings.host_id,
        instance_id=instance,
        disk_name="disk",
        path=str(settings.instances_dir / instance / "disk"),
        format="raw",
        virtual_size=2**20,
    )
    base = CachedImage(
        key="k", image_id="i", path="/x", format="raw", virtual_size=2**20, source_sha256=""
    )
    mapped = MappedDisk(
        prepared=PreparedDisk(disk=disk, base=base),
        view="/etc/shadow",
        partition=GuestPartition(table="none", number=None, offset=0, size=2**20),
        filesystem="ext4",
        method="fuse2fs",
    )

    # When mount_guest is sent directly
    result = send_step(
        clean_cluster,
        "imgprep.mount_guest",
        mapped.model_dump(mode="json"),
        prepare_request(instance),
        unique("op"),
    )

    # Then the view is refused before the disk is looked for
    with pytest.raises(InvalidRequest, match="mapped view /etc/shadow"):
        result.get(timeout=60)
