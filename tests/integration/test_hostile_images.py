"""Hostile images through the whole system: `imgprep inspect` and prepare_disk on real workers.

Each image of tests/support/hostile_images.py is served over HTTP and asked for as a disk. The
fetch step must refuse it with its reason in the error, at once (one GET, one attempt, no
retry), and leave nothing in the cache: no entry, no record, no .part or .converted.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from domain.cache.directory import cache_key
from domain.core.errors import ImageRefused
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from tests.integration.conftest import Cluster, unique
from tests.support.hostile_images import HOSTILE, Hostile, build, qcow2_image
from worker.cli.demo.image_server import ImageServer

MiB = 2**20
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.name)
def test_prepare_disk_refuses_hostile_image_and_leaves_nothing(
    hostile: Hostile, clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a hostile image served by the image service, declared as the attacker declares it
    name = unique(hostile.name)
    build(hostile, image_server.root, name)
    image_id = unique("img")
    request = PrepareRequest(
        image=ImageSource(
            url=image_server.url(name),
            image_id=image_id,
            declared_format=hostile.declared,  # type: ignore[arg-type]
        ),
        disk=DiskSpec(instance_id=unique("vm"), size_bytes=64 * MiB),
    )

    # When a disk is prepared from it on the real workers
    result = clean_cluster.client.prepare_disk(request)
    with pytest.raises(ImageRefused) as refused:
        clean_cluster.client.wait_prepared(result, timeout=60)

    # Then the error names the image and the reason
    message = str(refused.value)
    assert f"image {image_id} from {image_server.url(name)} is refused: " in message
    assert hostile.reason in message
    # and it was not retried: one download, one attempt of the fetch step
    assert image_server.gets(name) == 1
    view = clean_cluster.journal.read(result.id)
    assert view is not None
    # (the journal's FAILURE lands just after the result; a retry would have started already)
    fetch = [r for r in view.records.values() if r.name.endswith("fetch_to_cache")]
    assert [r.attempts for r in fetch] == [1]
    assert all(r.state != "RETRY" for r in fetch)
    # and nothing is left in the cache or the instances directory
    assert not list(clean_cluster.settings.cache_dir.glob(f"{cache_key(image_id)}*"))
    assert not (clean_cluster.settings.instances_dir / request.disk.instance_id / "disk").exists()


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.name)
def test_inspect_refuses_hostile_image_with_one_line(
    hostile: Hostile, clean_cluster: Cluster, tmp_path: Path
) -> None:
    # Given a hostile image on disk
    path = build(hostile, tmp_path)

    # When a person inspects it as declared, in text and as JSON
    text = clean_cluster.cli("inspect", str(path), "--format", hostile.declared)
    as_json = clean_cluster.cli("inspect", str(path), "--format", hostile.declared, "--json")

    # Then both exit non-zero with one line on stderr that names the reason
    assert text.returncode == 1 and text.stdout == ""
    assert text.stderr.count("\n") == 1, text.stderr
    assert text.stderr.startswith(f"imgprep: {path} refused: ")
    assert hostile.reason in text.stderr
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 1
    assert report["verdict"] == "refused" and hostile.reason in report["reason"]
    assert report["virtual_size"] is None


def test_inspect_accepts_a_safe_image_as_what_it_is(clean_cluster: Cluster, tmp_path: Path) -> None:
    # Given a self-contained qcow2
    path = tmp_path / "safe.qcow2"
    qcow2_image(path)

    # When it is inspected without a declaration, as qcow2, and as JSON
    plain = clean_cluster.cli("inspect", str(path))
    declared = clean_cluster.cli("inspect", str(path), "--format", "qcow2")
    report = clean_cluster.cli("inspect", str(path), "--json")

    # Then it is safe, and the JSON gives its format and virtual size
    assert plain.returncode == declared.returncode == report.returncode == 0
    assert "qcow2, 64.0 MiB virtual, safe to use" in plain.stdout
    assert json.loads(report.stdout) == {
        "path": str(path),
        "format": "qcow2",
        "virtual_size": 64 * MiB,
        "verdict": "safe",
        "reason": None,
    }


def test_resource_bomb_is_refused_by_a_worker_under_tight_limits(
    clean_cluster: Cluster, image_server: ImageServer
) -> None:
    # Given a qcow2 whose 32 MiB L1 table qemu-img must allocate to open it, and a worker whose
    # qemu-img info runs under a 96 MiB address space (consuming a queue of its own)
    name = unique("bomb") + ".qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
         str(image_server.root / name), "128G"],
        check=True,
    )  # fmt: skip
    queue = unique("imgprep.limits")
    worker = clean_cluster.start_worker(
        "limits",
        env={"IMGPREP_QEMU__INFO_ADDRESS_SPACE_BYTES": str(96 * MiB)},
        extra_args=("-Q", queue),
    )
    image_id = unique("img")
    request = PrepareRequest(
        image=ImageSource(url=image_server.url(name), image_id=image_id),
        disk=DiskSpec(instance_id=unique("vm"), size_bytes=128 * 2**30),
    )
    try:
        # When that worker runs the fetch step for it
        result = clean_cluster.app.send_task(
            "imgprep.fetch_to_cache", args=[request.model_dump(mode="json")], queue=queue
        )
        with pytest.raises(ImageRefused) as refused:
            result.get(timeout=60)
    finally:
        worker.stop()

    # Then the image is refused as a resource bomb, once, and nothing is cached
    assert "under its limits (30 s CPU, 96 MiB address space)" in str(refused.value)
    assert "possible resource bomb" in str(refused.value)
    assert image_server.gets(name) == 1
    assert not list(clean_cluster.settings.cache_dir.glob(f"{cache_key(image_id)}*"))
