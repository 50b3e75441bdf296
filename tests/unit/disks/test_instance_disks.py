"""The disk steps on a cached base (domain.disks.instance_disks): a qcow2 overlay and a sparse raw
copy, made once, refused when they cannot be what the request wants, with the base referenced
for as long as a disk uses it and the canvas's pin dropped once the disk is made.

Real qemu-img and files in a temporary directory; the locks and references are the in-memory
fakes of their ports (tests/fakes). No root, no Redis."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from domain.cache.directory import ImageCache, cache_key
from domain.cache.fetch import fetch_image
from domain.cache.references import disk_holder
from domain.cache.staging import FetchOptions
from domain.core.errors import BaseImageMissing, DiskConflict, DiskTooSmall, InvalidRequest
from domain.core.models import CachedImage, ImageSource, PreparedDisk, PrepareRequest
from domain.core.runner import Limits, Runner
from domain.disks.instance_disks import DiskContext, create_instance_disk
from domain.formats import qemu_img
from tests.conftest import need_tools
from tests.fakes.locks import InMemoryLocks
from tests.fakes.references import InMemoryReferences
from tests.support.source_policy import FilePolicy


def create_overlay(*args: Any, **kwargs: Any) -> PreparedDisk:
    """The qcow2 disk step's domain call."""
    return create_instance_disk("qcow2", *args, **kwargs)


def copy_raw_disk(*args: Any, **kwargs: Any) -> PreparedDisk:
    """The raw disk step's domain call."""
    return create_instance_disk("raw", *args, **kwargs)


MiB = 2**20
PIN = "pending:canvas-1"
pytestmark = pytest.mark.timeout(120)


@dataclass
class Host:
    ctx: DiskContext
    references: InMemoryReferences
    base: CachedImage  # the cached base, as the fetch step answered it
    source: ImageSource

    def request(
        self, size: int = 8 * MiB, backend: str = "qcow2", disk: str = "disk"
    ) -> PrepareRequest:
        return PrepareRequest.model_validate(
            {
                "image": self.source.model_dump(),
                "disk": {
                    "instance_id": "vm-1",
                    "disk_name": disk,
                    "size_bytes": size,
                    "backend": backend,
                },
            }
        )

    def disk_path(self, disk: str = "disk") -> Path:
        return self.ctx.instances_dir / "vm-1" / disk

    def instance_files(self) -> list[str]:
        return sorted(p.name for p in (self.ctx.instances_dir / "vm-1").iterdir())


@pytest.fixture
def host(tmp_path: Path) -> Host:
    need_tools("qemu-img")
    for sub in ("cache", "instances", "sources"):
        (tmp_path / sub).mkdir()
    image = tmp_path / "sources" / "base.raw"
    with image.open("wb") as handle:  # 4 MiB, sparse, with data at its start and middle
        handle.truncate(4 * MiB)
        handle.write(b"\0" * 4096 + os.urandom(64 * 1024))
        handle.seek(2 * MiB)
        handle.write(os.urandom(64 * 1024))
    source = ImageSource(url=image.as_uri(), image_id="base-image", declared_format="raw")
    cache = ImageCache(tmp_path / "cache")
    runner = Runner(default_timeout=60)
    locks = InMemoryLocks()
    base = fetch_image(
        source,
        cache=cache,
        options=FetchOptions(FilePolicy(file_roots=(tmp_path / "sources",)), Limits()),
        runner=runner,
        locks=locks,
    )
    references = InMemoryReferences()
    references.add(base.key, PIN)  # the canvas's pin, as the fetch step leaves it
    ctx = DiskContext(
        cache=cache,
        instances_dir=tmp_path / "instances",
        host="host-a",
        runner=runner,
        locks=locks,
        references=references,
        limits=Limits(),
    )
    return Host(ctx=ctx, references=references, base=base, source=source)


def test_an_overlay_uses_its_base_and_holds_a_reference_to_it(host: Host) -> None:
    # When the qcow2 disk step runs
    prepared = create_overlay(host.request(), host.base, host.ctx, pin=PIN)
    # Then the disk is a qcow2 overlay of the requested size on the cache entry
    path = host.disk_path()
    info = qemu_img.info(host.ctx.runner, path, "qcow2", Limits())
    assert info.backing_filename == host.base.path
    assert info.virtual_size == 8 * MiB
    assert prepared.disk.path == str(path) and prepared.disk.format == "qcow2"
    assert prepared.base == host.base
    # and disk.info recorded its format; the disk references its base; the pin is dropped
    assert json.loads((path.parent / "disk.info").read_text()) == {"disk": "qcow2"}
    assert set(host.references.holders(host.base.key)) == {disk_holder("host-a", "vm-1", "disk")}
    assert host.instance_files() == ["disk", "disk.info"]


def test_a_raw_copy_is_sparse_holds_the_bases_bytes_and_references_nothing(host: Host) -> None:
    # When the raw disk step runs
    prepared = copy_raw_disk(host.request(backend="raw"), host.base, host.ctx, pin=PIN)
    # Then the disk is the base's bytes, grown to the requested size, keeping the base's holes
    path = host.disk_path()
    data = path.read_bytes()
    assert len(data) == 8 * MiB
    assert data[: 4 * MiB] == Path(host.base.path).read_bytes()
    assert data[4 * MiB :].count(0) == 4 * MiB
    assert path.stat().st_blocks * 512 < 2 * MiB
    assert prepared.disk.format == "raw" and prepared.disk.backing_file is None
    # and nothing references the base any more: the copy outlives its cache entry
    assert host.references.holders(host.base.key) == {}


@pytest.mark.parametrize("step", [create_overlay, copy_raw_disk])
def test_the_step_again_answers_the_same_disk_untouched(host: Host, step: object) -> None:
    # Given a disk the step made
    backend = "qcow2" if step is create_overlay else "raw"
    request = host.request(backend=backend)
    first = step(request, host.base, host.ctx, pin=PIN)  # type: ignore[operator]
    stamp = host.disk_path().stat()
    # When the same request runs again (a redelivered message)
    host.references.add(host.base.key, PIN)
    again = step(request, host.base, host.ctx, pin=PIN)  # type: ignore[operator]
    # Then it answers the same disk, not rewritten, and no temporary is left
    assert again == first
    after = host.disk_path().stat()
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    assert host.instance_files() == ["disk", "disk.info"]
    assert PIN not in host.references.holders(host.base.key)


def test_a_disk_smaller_than_its_base_is_refused_and_nothing_is_left(host: Host) -> None:
    # When a disk of 1 MiB is asked of a 4 MiB base
    with pytest.raises(DiskTooSmall, match="ask for at least 4194304"):
        create_overlay(host.request(size=1 * MiB), host.base, host.ctx, pin=PIN)
    # Then no disk and no reference remain: a refusal is final, the pin goes too
    assert not host.disk_path().exists()
    assert host.references.holders(host.base.key) == {}


def test_an_existing_disk_of_another_format_is_a_conflict(host: Host) -> None:
    # Given a raw disk made for the instance
    copy_raw_disk(host.request(backend="raw"), host.base, host.ctx, pin=PIN)
    # When a qcow2 disk of the same name is asked for
    host.references.add(host.base.key, PIN)
    with pytest.raises(DiskConflict, match="already exists as a raw disk"):
        create_overlay(host.request(), host.base, host.ctx, pin=PIN)
    # Then the raw disk is untouched, and the refused overlay left no reference on the base
    assert len(host.disk_path().read_bytes()) == 8 * MiB
    assert host.references.holders(host.base.key) == {}


def test_an_existing_overlay_of_another_size_is_a_conflict_and_keeps_its_reference(
    host: Host,
) -> None:
    # Given an 8 MiB overlay
    create_overlay(host.request(), host.base, host.ctx, pin=PIN)
    holder = disk_holder("host-a", "vm-1", "disk")
    # When a 16 MiB one is asked of the same name
    host.references.add(host.base.key, PIN)
    with pytest.raises(DiskConflict, match="the request wants"):
        create_overlay(host.request(size=16 * MiB), host.base, host.ctx, pin=PIN)
    # Then the existing overlay still uses the base, so its reference stays
    assert set(host.references.holders(host.base.key)) == {holder}
    assert qemu_img.info(host.ctx.runner, host.disk_path(), "qcow2", Limits()).virtual_size == (
        8 * MiB
    )


def test_a_base_evicted_before_the_disk_step_is_missing(host: Host) -> None:
    # Given a base the cache manager removed after the fetch step answered
    Path(host.base.path).unlink()
    # When the disk step runs
    with pytest.raises(BaseImageMissing, match="send the request again to fetch it"):
        create_overlay(host.request(), host.base, host.ctx, pin=PIN)
    # Then no disk was made and nothing references the key
    assert not host.disk_path().exists()
    assert host.references.holders(host.base.key) == {}


def test_a_claimed_entry_of_another_image_is_refused(host: Host) -> None:
    # Given a message whose claimed cache entry is not the request's image's
    other = host.base.model_copy(update={"key": cache_key("another-image")})
    # When the disk step runs
    with pytest.raises(InvalidRequest, match="is not the entry of image base-image"):
        create_overlay(host.request(), other, host.ctx, pin=PIN)
    # Then no disk was made
    assert not host.disk_path().exists()


def test_the_base_is_found_by_its_key_never_by_the_path_in_the_message(host: Host) -> None:
    # Given a claimed base whose path and format were rewritten on the wire
    forged = host.base.model_copy(update={"path": "/etc/shadow", "format": "qcow2"})
    # When the disk step runs
    prepared = create_overlay(host.request(), forged, host.ctx, pin=PIN)
    # Then the overlay's backing file is the cache entry of the request's image
    info = qemu_img.info(host.ctx.runner, host.disk_path(), "qcow2", Limits())
    assert info.backing_filename == str(host.ctx.cache.entry(cache_key("base-image")))
    assert prepared.base.path == host.base.path


def test_preallocation_reserves_the_whole_disk(host: Host) -> None:
    # Given a host that preallocates disks (preallocate_images = "space")
    from dataclasses import replace

    ctx = replace(host.ctx, preallocate=True)
    # When the raw disk step runs
    copy_raw_disk(host.request(backend="raw"), host.base, ctx, pin=PIN)
    # Then every byte of the disk is allocated
    assert host.disk_path().stat().st_blocks * 512 >= 8 * MiB
