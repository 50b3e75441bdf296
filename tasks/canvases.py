"""Canvases: plain functions that build the chain of step signatures for an operation.

Steps are named, not imported, so building a canvas needs no task module. Each step's task id
is fixed here, the last one being the id the caller holds, so the entry task can record the
plan in the journal before it replaces itself with the chain.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from celery import Signature, chain, chord, signature

from domain.cache.precache_models import PrecacheReport
from domain.core.models import CachedImage, DeleteDiskRequest, ImageSource, PrepareRequest
from domain.formats.snapshot_models import SnapshotRequest
from worker.app.routing import DEFAULT_QUEUE, fetch_queue, host_queue

# The step that creates an instance disk, by backend (Nova's images_type).
DISK_STEPS = {
    "qcow2": "imgprep.create_overlay",
    "raw": "imgprep.copy_raw_disk",
    "rbd": "imgprep.clone_rbd_disk",
}


def prepare_disk_steps(
    request: PrepareRequest,
    *,
    host: str,
    operation: str | None = None,
    cached: CachedImage | None = None,
    scope: str = "shared",
) -> list[Signature]:
    """fetch_to_cache on any worker (shared scope) or on the host (host scope: its own cache),
    then the instance disk on the host that will hold it; with files to inject, then map, mount,
    inject and teardown on that host too.

    `cached`: the image is already in the cache (the entry task looked, and pinned it): the
    fetch step's postcondition holds, so the canvas starts with the disk step.
    """
    if request.inject:
        if operation is None:
            raise ValueError("injection steps need the operation id that owns the disk")
        return [
            *prepare_disk_steps(
                request.model_copy(update={"inject": ()}), host=host, cached=cached, scope=scope
            ),
            *injection_steps(request, host=host, operation=operation),
        ]
    payload = request.model_dump(mode="json")
    disk_step = DISK_STEPS[request.disk.backend]
    if request.disk.backend == "rbd":
        # Both on the host's queue: its workers know its cluster (rbd.conf); the import's lease
        # is the cluster's, so a burst across many hosts of one cluster imports once.
        return [
            signature(
                "imgprep.import_to_rbd", args=(payload,), immutable=True, queue=host_queue(host)
            ),
            signature(disk_step, args=(payload,), queue=host_queue(host)),
        ]
    if cached is not None:
        base = cached.model_dump(mode="json")
        return [signature(disk_step, args=(base, payload), queue=host_queue(host))]
    return [
        signature(
            "imgprep.fetch_to_cache",
            args=(payload,),
            immutable=True,
            queue=fetch_queue(scope, host),
        ),
        signature(disk_step, args=(payload,), queue=host_queue(host)),
    ]


def snapshot_steps(request: SnapshotRequest, *, host: str) -> list[Signature]:
    """On the host that holds the disk: plan the conversion from its format record, convert;
    an rbd disk's snapshot is one step on a worker of the host (whose cluster holds it)."""
    payload = request.model_dump(mode="json")
    if request.backend == "rbd":
        return [signature("imgprep.snapshot_rbd", args=(payload,), queue=host_queue(host))]
    return [
        signature("imgprep.snapshot_source", args=(payload,), queue=host_queue(host)),
        signature("imgprep.convert", queue=host_queue(host)),
    ]


def injection_steps(request: PrepareRequest, *, host: str, operation: str) -> list[Signature]:
    """map → mount → inject → teardown on the disk's host; every one of them, should it fail for
    good, has the disk's devices released by imgprep.release_devices on that host too."""
    queue = host_queue(host)
    full = request.model_dump(mode="json")
    # Only inject_files needs the files; the other steps get the request without them.
    slim = request.model_copy(update={"inject": ()}).model_dump(mode="json")
    release = signature(
        "imgprep.release_devices", args=(slim, operation), immutable=True, queue=queue
    )
    steps = [
        signature("imgprep.map_partitions", args=(slim, operation), queue=queue),
        signature("imgprep.mount_guest", args=(slim, operation), queue=queue),
        signature("imgprep.inject_files", args=(full, operation), queue=queue),
        signature("imgprep.teardown", args=(slim, operation), queue=queue),
    ]
    for step in steps:
        step.link_error(release.clone())
    return steps


def with_ids(steps: Sequence[Signature], final_id: str) -> chain:
    """Chain `steps`, the last one under `final_id` and the others under new ids."""
    for step in steps[:-1]:
        step.set(task_id=str(uuid.uuid4()))
    steps[-1].set(task_id=final_id)
    return chain(*steps)


def delete_disk_steps(request: DeleteDiskRequest, *, host: str) -> list[Signature]:
    """The disk is removed on the host that holds it (an rbd disk: by a worker of the host whose
    cluster holds it)."""
    payload = request.model_dump(mode="json")
    step = "imgprep.remove_rbd_disk" if request.backend == "rbd" else "imgprep.remove_disk"
    return [signature(step, args=(payload,), queue=host_queue(host))]


def precache_steps(
    images: Sequence[ImageSource], hosts: Sequence[str], *, refused: PrecacheReport, final_id: str
) -> tuple[Signature, list[Signature]]:
    """One imgprep.precache_host per host, on its queue, at once; then imgprep.precache_report
    (under `final_id`) with their reports and `refused` (hosts that could not be asked). The
    canvas, and its steps in the order a journal shows them."""
    payload = [image.model_dump(mode="json") for image in images]
    body = signature(
        "imgprep.precache_report",
        args=(refused.model_dump(mode="json"),),
        queue=DEFAULT_QUEUE,
    ).set(task_id=final_id)
    header = [
        signature(
            "imgprep.precache_host",
            args=({"images": payload, "host": host},),
            queue=host_queue(host),
        ).set(task_id=str(uuid.uuid4()))
        for host in hosts
    ]
    if not header:  # nothing to wait for: the report of the refused hosts alone
        body.args = ([], *body.args)
        return body, [body]
    return chord(header, body).set(task_id=final_id), [*header, body]
