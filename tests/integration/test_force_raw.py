"""force_raw on real qemu-img: a qcow2 download becomes a raw cache entry that stays sparse."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from domain.cache.directory import cache_key
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from domain.core.sparse import allocated_bytes
from tests.integration.conftest import Cluster, unique
from worker.cli.demo.image_server import ImageServer

MiB = 2**20
GiB = 2**30


def sparse_qcow2(directory: Path, name: str, *, chunks: int) -> tuple[Path, int]:
    """A qcow2 of 1 GiB virtual size with `chunks` MiB of random data spread over it."""
    raw = directory / f"{name}.source-raw"
    with open(raw, "wb") as handle:
        handle.truncate(GiB)
        for index in range(chunks):
            handle.seek(index * (GiB // chunks))
            handle.write(os.urandom(MiB))
    qcow2 = directory / name
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    raw.unlink()
    return qcow2, chunks * MiB


def test_qcow2_is_cached_as_sparse_raw_equal_to_qemu_img_convert(
    clean_cluster: Cluster, image_server: ImageServer, tmp_path: Path
) -> None:
    # Given a qcow2 of 1 GiB virtual size holding 4 MiB of data, served by the image service
    name = unique("sparse") + ".qcow2"
    served, written = sparse_qcow2(image_server.root, name, chunks=4)
    image_id = unique("img")
    request = PrepareRequest(
        image=ImageSource(url=image_server.url(name), image_id=image_id),
        disk=DiskSpec(instance_id=unique("vm"), size_bytes=GiB),
    )

    # When a disk is prepared from it with force_raw (the default)
    prepared = clean_cluster.client.wait_prepared(
        clean_cluster.client.prepare_disk(request), timeout=120
    )

    # Then the cache entry is raw, of the image's virtual size
    base = Path(prepared.base.path)
    assert base == clean_cluster.settings.cache_dir / cache_key(image_id)
    assert (prepared.base.format, prepared.base.virtual_size) == ("raw", GiB)
    assert base.stat().st_size == GiB
    record = json.loads(base.with_name(base.name + ".json").read_text())
    assert record["source_format"] == "qcow2"
    # and its content is what `qemu-img convert` makes of the source
    reference = tmp_path / "reference.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(served), str(reference)],
        check=True,
    )
    assert reference.stat().st_size == base.stat().st_size
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(base), str(reference)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    # and it stays sparse: its allocated blocks are within 10 % of the data written
    allocated = allocated_bytes(base)
    print(f"force_raw: {written} bytes of data, {allocated} bytes allocated, {GiB} virtual")
    assert abs(allocated - written) <= written // 10
    # and the overlay on it is backed by the raw entry
    assert prepared.disk.backing_format == "raw"
