"""Hostile requests sent to real workers fail at once with InvalidRequest and change nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from domain.cache.directory import cache_key
from domain.core.errors import InvalidRequest
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from worker.cli.demo.image_server import ImageServer
from worker.stores.redis_references import REFS_PREFIX
from worker.stores.replies import text

MiB = 2**20


def _prepared_disk(cluster: Cluster, server: ImageServer) -> tuple[PrepareRequest, Path]:
    name = unique("wire") + ".raw"
    write_raw_image(server.root / name, size=4 * MiB, data=b"w" * 512)
    request = PrepareRequest(
        image=ImageSource(url=server.url(name), image_id=unique("img")),
        disk=DiskSpec(instance_id=unique("vm"), size_bytes=8 * MiB),
    )
    prepared = cluster.client.wait_prepared(cluster.client.prepare_disk(request), timeout=90)
    return request, Path(prepared.disk.path)


def _send_raw(cluster: Cluster, task: str, payload: dict[str, Any]) -> Any:
    """What a control plane in another language sends: the payload as it is, and its own
    argsrepr (no imgprep code checks or redacts it on the way)."""
    return cluster.app.send_task(
        task, args=[payload], queue="imgprep", argsrepr=json.dumps(["<request>"])
    )


def test_delete_disk_cannot_erase_the_format_record(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a prepared disk and its disk.info record
    request, disk = _prepared_disk(clean_cluster, image_server)
    record = disk.parent / "disk.info"
    before = record.read_bytes()

    # When a control plane asks to delete "disk.info"
    payload = {"instance_id": request.disk.instance_id, "disk_name": "disk.info"}
    with pytest.raises(InvalidRequest, match="reserved"):
        _send_raw(clean_cluster, "imgprep.delete_disk", payload).get(timeout=60)

    # Then the record and the disk are untouched
    assert record.read_bytes() == before and disk.is_file()
    clean_cluster.client.send("imgprep.delete_disk", {"instance_id": request.disk.instance_id}).get(
        timeout=60
    )


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:99999/x", "http://127.0.0.1:8080/x\r\nX: 1", "http://h/x#@127.0.0.1/"],
)
def test_a_bad_url_for_a_cached_image_fails_at_once_and_pins_nothing(
    clean_cluster: Cluster, image_server: ImageServer, url: str
) -> None:
    # Given an image that is cached
    request, disk = _prepared_disk(clean_cluster, image_server)
    key = cache_key(request.image.image_id)

    # When another request names the same image with a URL that is not valid
    payload = request.model_dump(mode="json")
    payload["image"]["url"] = url
    payload["disk"]["instance_id"] = unique("vm")
    with pytest.raises(InvalidRequest, match=r"image\.url"):
        _send_raw(clean_cluster, "imgprep.prepare_disk", payload).get(timeout=60)

    # Then no canvas pinned the cached image (the first disk's reference is the only one)
    holders = clean_cluster.redis.hkeys(REFS_PREFIX + key)
    assert [text(h) for h in holders] == [
        f"{clean_cluster.settings.host_id}/{request.disk.instance_id}/disk"
    ]
    clean_cluster.client.send("imgprep.delete_disk", {"instance_id": request.disk.instance_id}).get(
        timeout=60
    )
    assert not disk.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("size_bytes", True), ("size_bytes", "8388608"), ("instance_id", 7)],
)
def test_values_of_the_wrong_json_type_are_refused(
    clean_cluster: Cluster, field: str, value: object
) -> None:
    payload = {
        "image": {"url": "http://127.0.0.1:9/x.raw", "image_id": unique("img")},
        "disk": {"instance_id": unique("vm"), "size_bytes": 8 * MiB, field: value},
    }
    with pytest.raises(InvalidRequest, match=rf"disk\.{field}"):
        _send_raw(clean_cluster, "imgprep.prepare_disk", payload).get(timeout=60)
