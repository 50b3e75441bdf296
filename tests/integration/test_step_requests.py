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
    DiskSpec,
    ImageSource,
    PrepareRequest,
)
from tests.integration.conftest import Cluster, unique
from worker.routing import host_queue


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

