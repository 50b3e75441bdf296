"""The wire contract from outside: clients that never import imgprep enqueue an operation by
name with one JSON argument and read its result (a plain Celery app; kombu and redis-py alone)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from domain.core.errors import InvalidRequest
from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from worker.cli.demo.image_server import ImageServer

MiB = 2**20

NOT_IMGPREP = """
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("worker", "tasks", "tests"))
assert not leaked, leaked
"""

PLAIN_CELERY = """
import json, sys
from celery import Celery

broker = sys.argv[1]
request = json.loads(sys.argv[2])
app = Celery(broker=broker, backend=broker)
app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
result = app.send_task("imgprep.prepare_disk", args=[request], queue="imgprep")
print(json.dumps({"task_id": result.id, "result": result.get(timeout=120)}))
"""

KOMBU_ONLY = """
import json, sys, time, uuid
import kombu, redis

broker = sys.argv[1]
request = json.loads(sys.argv[2])
task_id = str(uuid.uuid4())
headers = {
    "lang": "py", "task": "imgprep.prepare_disk", "id": task_id, "root_id": task_id,
    "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
    "timelimit": [None, None], "argsrepr": json.dumps([request]), "kwargsrepr": "{}",
    "origin": "kombu-only-client",
}
body = [[request], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
with kombu.Connection(broker) as connection:
    connection.Producer().publish(
        body, routing_key="imgprep", exchange="", serializer="json", headers=headers,
        correlation_id=task_id,
    )
results = redis.Redis.from_url(broker)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    raw = results.get("celery-task-meta-" + task_id)
    meta = json.loads(raw) if raw else {}
    if meta.get("status") in ("SUCCESS", "FAILURE"):
        break
    time.sleep(0.1)
print(json.dumps({"task_id": task_id, "status": meta.get("status"), "result": meta.get("result")}))
"""


def run_outside(
    script: str, cluster: Cluster, request: dict[str, object], cwd: Path
) -> dict[str, Any]:
    """Run `script` in a fresh interpreter whose path does not hold this checkout."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("IMGPREP_", "PYTHON"))}
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            textwrap.dedent(script) + NOT_IMGPREP,
            cluster.redis_server.url,
            json.dumps(request),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def request_for(image_server: ImageServer) -> dict[str, object]:
    name = unique("wire") + ".raw"
    write_raw_image(image_server.root / name, size=4 * MiB, data=b"wire" * 1024)
    return {
        "image": {"url": image_server.url(name), "image_id": unique("img")},
        "disk": {"instance_id": unique("vm"), "size_bytes": 16 * MiB},
    }


def test_plain_celery_client_enqueues_by_name_and_gets_the_result(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given a request as a control plane writes it, as plain JSON
    request = request_for(image_server)

    # When a Celery app that knows nothing of imgprep sends imgprep.prepare_disk
    answer = run_outside(PLAIN_CELERY, clean_cluster, request, tmp_path)

    # Then it gets the PreparedDisk, as a dict, under the id it sent
    result = answer["result"]
    assert result["kind"] == "prepared_disk" and result["api_version"] == 1
    assert result["disk"]["instance_id"] == request["disk"]["instance_id"]  # type: ignore[index]
    assert Path(result["disk"]["path"]).is_file()
    assert clean_cluster.journal.read(answer["task_id"]) is not None


def test_kombu_message_and_redis_result_without_celery(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given a request
    request = request_for(image_server)

    # When it is sent as a protocol 2 message with kombu alone, the result read with redis-py
    answer = run_outside(KOMBU_ONLY, clean_cluster, request, tmp_path)

    # Then the stored result is the PreparedDisk
    assert answer["status"] == "SUCCESS"
    assert answer["result"]["disk"]["instance_id"] == request["disk"]["instance_id"]  # type: ignore[index]
    assert Path(answer["result"]["disk"]["path"]).is_file()


def test_invalid_request_fails_with_its_error_class_for_a_plain_client(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given a request with a size of zero bytes
    request = request_for(image_server)
    request["disk"]["size_bytes"] = 0  # type: ignore[index]

    # When a kombu-only client sends it
    answer = run_outside(KOMBU_ONLY, clean_cluster, request, tmp_path)

    # Then the stored failure names the error class and the field
    assert answer["status"] == "FAILURE"
    assert answer["result"]["exc_type"] == "InvalidRequest"
    assert "disk.size_bytes" in answer["result"]["exc_message"][0]


ENTRY_TASKS = ("imgprep.prepare_disk", "imgprep.snapshot", "imgprep.delete_disk")


def test_bad_call_shapes_fail_with_invalid_request(clean_cluster: Cluster) -> None:
    # Given a request object (its content does not matter: the call's shape is wrong)
    request = {"instance_id": unique("vm")}
    shapes: list[tuple[str, list[object], dict[str, object], str]] = []
    for name in ENTRY_TASKS:
        shapes += [
            (name, [request, request], {}, "2 positional arguments"),
            (name, [request], {"bogus": 1}, "bogus"),
            (name, [], {"request": request, "extra": True}, "extra"),
            (name, [], {}, "no request"),
        ]
    shapes.append(("imgprep.evict_cache", [{}, {}], {}, "2 positional arguments"))
    shapes.append(("imgprep.evict_cache", [], {"dry_run": True}, "dry_run"))

    # When an entry task is sent two positional arguments, an unknown keyword argument, or none
    sent = [
        (clean_cluster.app.send_task(name, args=args, kwargs=kwargs, queue="imgprep"), why)
        for name, args, kwargs, why in shapes
    ]

    # Then each fails at once with InvalidRequest saying what was wrong, stored as its failure
    for result, why in sent:
        with pytest.raises(InvalidRequest, match=why):
            result.get(timeout=60)
        assert result.state == "FAILURE"
