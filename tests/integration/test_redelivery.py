"""A message that comes back after its task ended does not run again (worker/app/redelivery.py).

Found by the fault campaign (seed 3): a disk came back after its delete had succeeded. A worker
killed after a step ended but before its acknowledgement reached Redis leaves the message to be
put back on its queue; delivered again, the step ran again, after the control plane had moved
on. The message is put back here exactly as the broker puts one back (the same payload, marked
`redelivered`), without waiting for a kill to land in that window.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from tests.integration.test_reliability import request_for
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer

MiB = 2**20
PARKED = "imgprep.test.parked"  # a queue no worker consumes


def logged(cluster: Cluster, event: str) -> bool:
    return any(
        f'"event": "{event}"' in worker.log_path.read_text(errors="replace")
        for worker in cluster.workers
    )


def test_a_prepare_delivered_again_after_its_disk_was_deleted_does_not_create_it_again(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    cluster = clean_cluster
    name = unique("again") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"again" * 100)
    request = request_for(image_server.url(name), unique("img"), size=64 * MiB)

    # Given a prepare whose message was taken from Redis as a worker gets it, and that succeeded
    cluster.app.send_task(
        "imgprep.prepare_disk", args=[request.model_dump(mode="json")], queue=PARKED
    )
    raw = cluster.redis.lpop(PARKED)
    assert isinstance(raw, bytes)
    message = json.loads(raw)
    task_id = message["headers"]["id"]
    cluster.redis.lpush("imgprep", raw)
    result = cluster.client.result(task_id)
    prepared = cluster.client.wait_prepared(result, timeout=120)
    disk = Path(prepared.disk.path)
    assert disk.exists()

    # And its disk deleted since
    cluster.client.send("imgprep.delete_disk", {"instance_id": request.disk.instance_id}).get(
        timeout=60
    )
    assert not disk.exists()

    # When the broker puts the prepare's message back (a worker died before acknowledging it)
    message["headers"]["redelivered"] = True
    message["properties"]["delivery_info"]["redelivered"] = True
    cluster.redis.lpush("imgprep", json.dumps(message))

    # Then a worker takes it and skips it: the disk stays deleted and the operation's stored
    # result is the one the control plane read
    wait_for(
        lambda: logged(cluster, "redelivered_message_skipped") or disk.exists(),
        timeout=60,
        what="the redelivered prepare to be taken",
    )
    assert not disk.exists(), "the redelivered prepare created the deleted disk again"
    assert cluster.client.result(task_id).state == "SUCCESS"
    assert cluster.client.result(task_id).result == result.result
    wait_for(
        lambda: cluster.redis.llen("imgprep") == 0 and cluster.redis.hlen("unacked") == 0,
        timeout=30,
        what="the redelivered message to be acknowledged",
    )
    cluster.assert_clean()
