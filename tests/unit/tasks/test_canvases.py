"""Canvases of prepare_disk: the disk step alone, or with the device steps pinned to the
disk's host."""

from __future__ import annotations

import pytest

from domain.core.models import PrepareRequest
from tasks.canvases import prepare_disk_steps
from tests.unit.core.test_injection_request import request
from worker.app.routing import host_queue


def test_without_injection_the_canvas_is_unchanged() -> None:
    steps = prepare_disk_steps(PrepareRequest.model_validate(request()), host="h1")
    assert [s.task for s in steps] == ["imgprep.fetch_to_cache", "imgprep.create_overlay"]


def test_injection_adds_host_pinned_device_steps_each_with_the_release_errback() -> None:
    parsed = PrepareRequest.model_validate(
        request(inject=[{"path": "/etc/motd", "content": "hi"}], partition="none")
    )
    steps = prepare_disk_steps(parsed, host="h1", operation="op-1")
    assert [s.task for s in steps] == [
        "imgprep.fetch_to_cache",
        "imgprep.create_overlay",
        "imgprep.map_partitions",
        "imgprep.mount_guest",
        "imgprep.inject_files",
        "imgprep.teardown",
    ]
    assert [s.options["queue"] for s in steps[1:]] == [host_queue("h1")] * 5
    for step in steps[2:]:
        assert step.args[-1] == "op-1"
        (errback,) = step.options["link_error"]
        assert errback["task"] == "imgprep.release_devices"
        assert errback["options"]["queue"] == host_queue("h1")
        assert errback["immutable"] is True
        assert errback["args"][1] == "op-1"
    # only inject_files carries the files; the others get the request without them
    carrying = [
        s.task for s in steps if any(a.get("inject") for a in s.args if isinstance(a, dict))
    ]
    assert carrying == ["imgprep.inject_files"]


def test_injection_needs_the_operation_that_owns_the_disk() -> None:
    parsed = PrepareRequest.model_validate(request(inject=[{"path": "/a", "content": ""}]))
    with pytest.raises(ValueError, match="operation"):
        prepare_disk_steps(parsed, host="h1")
