"""What monitors see of task arguments: JSON, URLs without user info or signed queries."""

from __future__ import annotations

import json

from celery import Celery

from domain.core.redaction import message_reprs, redacted, redacted_text
from worker.app.results import RedactingRedisBackend, stored_form
from worker.cli.client import Client

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
    app.send_task = lambda name, **options: sent.append({"name": name, **options})

    # When the client sends an operation
    Client(app).send("imgprep.prepare_disk", {"image": {"url": SIGNED}})

    # Then the message carries the real URL, and its representation the redacted one
    assert sent[0]["args"] == [{"image": {"url": SIGNED}}]
    assert "abc123" not in str(sent[0]["argsrepr"]) and "pa55" not in str(sent[0]["argsrepr"])
    assert json.loads(str(sent[0]["argsrepr"]))[0]["image"]["url"].endswith("/ubuntu.qcow2")


def test_urls_inside_error_texts_are_redacted() -> None:
    text = f"ConnectionError: GET {SIGNED} failed; retried 'http://a:b@h:1/x?t=2'."
    assert redacted_text(text) == (
        "ConnectionError: GET https://images.example:8443/ubuntu.qcow2 failed; "
        "retried 'http://h:1/x'."
    )
    # a URL too malformed to parse (port out of range) still loses its credentials
    assert redacted_text("http://user:pw@host:99999/x?token=1") == "http://host:99999/x"


def test_result_records_are_stored_without_credentials() -> None:
    # Given the record Celery would store for a failed step that had a signed URL
    meta = {
        "status": "FAILURE",
        "result": {"exc_type": "OSError", "exc_message": [f"cannot open {SIGNED}"]},
        "traceback": f'Traceback ...\nOSError: cannot open {SIGNED}\n  File "x.py"',
        "args": [{"image": {"url": SIGNED}}],
        "kwargs": {"mirror": SIGNED},
        "name": "imgprep.fetch_to_cache",
    }

    # When it is put in the form the result backend stores
    stored = stored_form(meta)

    # Then no field carries the user info or the signature, and the rest is unchanged
    text = json.dumps(stored)
    assert "pa55" not in text and "abc123" not in text
    assert stored["args"] == [{"image": {"url": "https://images.example:8443/ubuntu.qcow2"}}]
    assert stored["name"] == "imgprep.fetch_to_cache"
    assert stored["result"]["exc_type"] == "OSError"


def test_the_app_stores_results_through_the_redacting_backend() -> None:
    from worker.app.application import create_app
    from worker.settings import Settings

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(app.backend, RedactingRedisBackend)
