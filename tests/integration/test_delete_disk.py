"""imgprep.delete_disk against a disk whose devices an operation holds."""

from __future__ import annotations

import pytest

from domain.core.errors import DiskBusy
from domain.core.models import DeletedDisk, DiskSpec, ImageSource, PrepareRequest
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from worker.cli.demo.image_server import ImageServer
from worker.stores.redis_ledger import RedisDeviceLedger

MiB = 2**20


def test_a_disk_in_use_is_not_deleted_under_its_operation(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a prepared disk whose devices another operation holds (mapped or mounted)
    name = unique("del") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"d" * 512)
    instance = unique("vm")
    prepared = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(
            PrepareRequest(
                image=ImageSource(url=image_server.url(name), image_id=unique("img")),
                disk=DiskSpec(instance_id=instance, size_bytes=8 * MiB),
            )
        ),
        timeout=60,
    )
    ledger = RedisDeviceLedger(clean_cluster.redis, clean_cluster.settings.host_id)
    ledger.claim(f"{instance}/disk", "another-operation", "test")

    # When it is deleted, then the operation finishes, and it is deleted again
    payload = {"instance_id": instance, "disk_name": "disk"}
    with pytest.raises(DiskBusy, match="in use by operation another-operation"):
        clean_cluster.client.send("imgprep.delete_disk", payload).get(timeout=60)
    still_there = prepared.disk.path
    ledger.drop(f"{instance}/disk", "another-operation")
    deleted = DeletedDisk.model_validate(
        clean_cluster.client.send("imgprep.delete_disk", payload).get(timeout=60)
    )

    # Then the first attempt left the disk alone, and the second removed it
    assert deleted.existed and deleted.path == still_there
    assert not (clean_cluster.settings.instances_dir / instance).exists()
