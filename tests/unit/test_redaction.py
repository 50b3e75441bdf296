"""What monitors see of task arguments: JSON, URLs without user info or signed queries."""

from __future__ import annotations

import json

from celery import Celery

from tasks.redaction import message_reprs, redacted
from worker.client import Client

SIGNED = "https://user:pa55@images.example:8443/ubuntu.qcow2?X-Amz-Signature=abc123&expires=9"


def test_urls_lose_user_info_and_query_wherever_they_are() -> None:
    payload = {"image": {"url": SIGNED, "image_id": "ubuntu"}, "mirrors": [SIGNED, "not a url"]}
    shown = redacted(payload)
    assert shown["image"]["url"] == "https://images.example:8443/ubuntu.qcow2"
    assert shown["mirrors"] == ["https://images.example:8443/ubuntu.qcow2", "not a url"]
    assert shown["image"]["image_id"] == "ubuntu"


def test_message_reprs_are_json_without_secrets() -> None:
    reprs = message_reprs([{"image": {"url": SIGNED}}, 3], {"flag": True})
    assert json.loads(reprs["argsrepr"]) == [
        {"image": {"url": "https://images.example:8443/ubuntu.qcow2"}},
        3,
    ]
    assert json.loads(reprs["kwargsrepr"]) == {"flag": True}
    assert "pa55" not in reprs["argsrepr"] and "abc123" not in reprs["argsrepr"]


def test_client_sends_redacted_argsrepr_and_the_real_argument() -> None:
    # Given a Celery app whose publishing we capture (no broker is reached)
    app = Celery(broker="memory://", backend="cache+memory://")
    sent: list[dict[str, object]] = []
    app.send_task = lambda name, **options: sent.append({"name": name, **options})  # type: ignore[method-assign]

    # When the client sends an operation
    Client(app).send("imgprep.prepare_disk", {"image": {"url": SIGNED}})

    # Then the message carries the real URL, and its representation the redacted one
    assert sent[0]["args"] == [{"image": {"url": SIGNED}}]
    assert "abc123" not in str(sent[0]["argsrepr"]) and "pa55" not in str(sent[0]["argsrepr"])
    assert json.loads(str(sent[0]["argsrepr"]))[0]["image"]["url"].endswith("/ubuntu.qcow2")
