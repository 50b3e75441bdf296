"""Workers accept JSON only: a pickled message is refused, never run."""

from __future__ import annotations

from celery import Celery

from tests.integration.conftest import Cluster
from tests.support.waiting import wait_for


def test_a_pickled_message_is_refused_not_run(clean_cluster: Cluster) -> None:
    # Given a client that sends pickle (an attacker's, or a misconfigured one)
    sender = Celery(broker=clean_cluster.settings.broker, backend=clean_cluster.settings.results)
    sender.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    pickled = sender.send_task("imgprep.ping", queue="imgprep")

    # When the workers have taken it off the queue (JSON pings sent after it come back) ...
    for _ in range(4):
        clean_cluster.app.send_task("imgprep.ping", queue="imgprep").get(timeout=30)
    logs = [worker.log_path for worker in clean_cluster.workers]
    refused = wait_for(
        lambda: any("untrusted content of type pickle" in p.read_text() for p in logs),
        timeout=30,
        what="a worker to refuse the pickled message",
    )

    # Then a worker refused it, and it never ran: no result was stored under its id
    assert refused
    assert clean_cluster.app.AsyncResult(pickled.id).state == "PENDING"
    assert clean_cluster.redis.get(f"celery-task-meta-{pickled.id}") is None
