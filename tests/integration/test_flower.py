"""Flower end to end: a real `imgprep flower` watching the real workers, read through its HTTP
API and rendered by headless Chromium. Arguments are JSON without secrets, progress and retries
show, and every step of the canvas ends in the right state."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_raw_image
from tests.integration.conftest import Cluster, unique
from tests.support.browser import ARTIFACTS, rendered_dom, screenshot
from tests.support.flower import FlowerProcess, start_flower
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.ports import free_port

MiB = 2**20
SECRET_PASSWORD = "s3cretPassw0rd"
SECRET_SIGNATURE = "SiGnAtUrE0123456789"


@pytest.fixture(scope="module")
def flower(cluster: Cluster) -> Iterator[FlowerProcess]:
    process = start_flower(
        port=free_port(), env=cluster.env, log_path=cluster.root / "flower" / "flower.log"
    )
    try:
        process.wait_http()
        process.wait_capturing(cluster.app)
        yield process
    finally:
        process.stop()


def secret_url(image_server: ImageServer, name: str) -> str:
    """A URL with user info and a signed query string, as object stores hand out."""
    plain = image_server.url(name)
    with_user = plain.replace("http://", f"http://operator:{SECRET_PASSWORD}@", 1)
    return f"{with_user}?X-Signature={SECRET_SIGNATURE}&expires=9999999999"


def test_flower_shows_every_step_with_progress_retries_and_state(
    clean_cluster: Cluster, image_server: ImageServer, flower: FlowerProcess
) -> None:
    # Given an image behind a signed URL, served slowly, whose first GET fails with a 503
    name = unique("flower") + ".raw"
    write_raw_image(image_server.root / name, size=12 * MiB, data=b"flower" * 4096)
    image_server.bytes_per_second = 3 * MiB
    image_server.fail_next(name, 503, times=1)
    instance = unique("vm")
    request = {
        "image": {"url": secret_url(image_server, name), "image_id": unique("img")},
        "disk": {"instance_id": instance, "size_bytes": 64 * MiB},
    }

    # When it is prepared while Flower watches, and Flower's API is read during the run
    result = clean_cluster.client.send("imgprep.prepare_disk", request)
    seen_progress: list[dict[str, object]] = []
    while not result.ready():
        for task in flower.tasks().values():
            if task["name"] == "imgprep.fetch_to_cache" and task["state"] == "PROGRESS":
                seen_progress.append(json.loads(task["result"]))
        time.sleep(0.1)
    prepared = result.get(timeout=120)
    view = clean_cluster.journal.read(result.id)
    assert view is not None
    steps = {planned.task_id: planned.name for planned in view.plan}
    tasks = wait_for_states(flower, {task_id: "SUCCESS" for task_id in steps})

    # Then every step of the canvas is in Flower under its name, with the right final state
    assert list(steps.values()) == ["imgprep.fetch_to_cache", "imgprep.create_overlay"]
    for task_id, step_name in steps.items():
        assert tasks[task_id]["name"] == step_name
        assert tasks[task_id]["state"] == "SUCCESS"
        assert tasks[task_id]["root_id"] == result.id
    # the last step carries the caller's id and the final result
    assert tasks[result.id]["name"] == "imgprep.create_overlay"
    assert instance in tasks[result.id]["result"]
    assert prepared["disk"]["instance_id"] == instance
    # the fetch step's retry is counted, and its progress was shown as state PROGRESS
    fetch_id = next(i for i, n in steps.items() if n == "imgprep.fetch_to_cache")
    assert tasks[fetch_id]["retries"] == 1
    assert seen_progress, "Flower never showed the fetch step in state PROGRESS"
    assert all(p["step"] == "fetch_to_cache" and p["total"] == 12 * MiB for p in seen_progress)
    assert all(0 <= int(str(p["done"])) <= 12 * MiB for p in seen_progress)
    progress_events = flower_event_count(flower, "task-progress", "imgprep.fetch_to_cache")
    assert progress_events >= 1
    # arguments are readable JSON, the URL without its user info and signature
    args = json.loads(tasks[fetch_id]["args"])
    assert args[0]["image"]["url"] == image_server.url(name)
    overlay_args = json.loads(tasks[result.id]["args"])
    assert overlay_args[0]["kind"] == "cached_image"
    assert overlay_args[1]["disk"]["instance_id"] == instance
    everything = flower.get("/api/tasks").data.decode()
    assert SECRET_PASSWORD not in everything and SECRET_SIGNATURE not in everything
    # and neither the workers' logs nor Celery's received/retry lines carry the secrets
    for worker in clean_cluster.workers:
        text = worker.log_path.read_text(errors="replace")
        assert SECRET_PASSWORD not in text and SECRET_SIGNATURE not in text

    # And the tasks page, rendered by a real browser, lists our steps
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    shot = screenshot(f"{flower.url}/tasks", ARTIFACTS / "flower" / f"flower-tasks-{stamp}.png")
    print(f"\nFlower tasks page screenshot: {shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    dom = rendered_dom(f"{flower.url}/tasks")
    assert "imgprep.fetch_to_cache" in dom and "imgprep.create_overlay" in dom
    assert fetch_id in dom and result.id in dom
    assert SECRET_PASSWORD not in dom and SECRET_SIGNATURE not in dom
    detail = screenshot(
        f"{flower.url}/task/{fetch_id}", ARTIFACTS / "flower" / f"flower-fetch-step-{stamp}.png"
    )
    print(f"Flower fetch step page screenshot: {detail}")
    assert "SUCCESS" in rendered_dom(f"{flower.url}/task/{fetch_id}")


def test_flower_shows_a_failed_step_and_the_skipped_rest(
    clean_cluster: Cluster, image_server: ImageServer, flower: FlowerProcess
) -> None:
    # Given a request whose checksum cannot match
    name = unique("flower-bad") + ".raw"
    write_raw_image(image_server.root / name, size=2 * MiB, data=b"bad" * 100)
    request = {
        "image": {
            "url": image_server.url(name),
            "image_id": unique("img"),
            "checksum": "sha256:" + "0" * 64,
        },
        "disk": {"instance_id": unique("vm"), "size_bytes": 64 * MiB},
    }

    # When it runs
    result = clean_cluster.client.send("imgprep.prepare_disk", request)
    with pytest.raises(Exception, match="expected sha256:0000"):
        result.get(timeout=60)
    view = clean_cluster.journal.read(result.id)
    assert view is not None
    fetch_id = view.plan[0].task_id

    # Then Flower shows the fetch step failed, with the error class and message, and the
    # operation too, under the caller's id (known to Flower as the entry task it was sent as)
    tasks = wait_for_states(flower, {fetch_id: "FAILURE", result.id: "FAILURE"})
    assert tasks[fetch_id]["name"] == "imgprep.fetch_to_cache"
    assert "ChecksumMismatch" in tasks[fetch_id]["exception"]
    assert tasks[fetch_id]["retries"] == 0
    assert tasks[result.id]["name"] == "imgprep.prepare_disk"
    assert "ChecksumMismatch" in tasks[result.id]["exception"]


def wait_for_states(
    flower: FlowerProcess, wanted: dict[str, str], timeout: float = 30
) -> dict[str, dict[str, Any]]:
    """Flower's tasks once every id in `wanted` has its state (events arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = flower.tasks()
        states = {task_id: tasks.get(task_id, {}).get("state") for task_id in wanted}
        if states == wanted or time.monotonic() > deadline:
            assert states == wanted, f"Flower shows {states}, expected {wanted}"
            return tasks
        time.sleep(0.1)


def flower_event_count(flower: FlowerProcess, event_type: str, task_name: str) -> float:
    """Flower's own counter of the events it received, by type and task name."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(flower.get("/metrics").data.decode()):
        for sample in family.samples:
            if (
                sample.name == "flower_events_total"
                and sample.labels.get("type") == event_type
                and sample.labels.get("task") == task_name
            ):
                total += sample.value
    return total


def test_artifacts_directory_is_ignored_by_git() -> None:
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().splitlines()
    assert "/artifacts/" in ignored
