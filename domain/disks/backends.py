"""The two kinds of instance disk (Nova's `images_type`): what differs between them, and only that.

* `Qcow2Overlay` (`Qcow2.create_image`): a copy-on-write qcow2 overlay with the cached base as
  backing file and the requested virtual size. It uses its base for as long as it exists, so it
  references the base (domain.cache.references).
* `RawCopy` (`Raw.create_image`): the cached base copied keeping its holes (`cp --sparse=always`,
  or `qemu-img convert` when the base is not raw), then grown with `qemu-img resize -f raw` (the
  format pinned: a guest-written header must never steer it). It has no backing file, so it
  outlives its cache entry and references nothing once copied.

The shape they share (lease, publish once, disk.info, preallocation, references) is
domain.disks.instance_disks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from domain.core import diskinfo
from domain.core.models import CachedImage, DiskFormat, DiskSpec
from domain.core.runner import Limits, Runner
from domain.core.sparse import sparse_copy
from domain.formats import qemu_img
from domain.formats.conversion import cache_mode_for


class DiskBackend(Protocol):
    """How one kind of instance disk is made from its base, and recognised once made."""

    format: DiskFormat
    references_base: bool  # whether the disk uses its base for as long as it exists
    created_event: str  # the log event of a disk made

    def mismatch(
        self, existing: qemu_img.ImageInfo, base: CachedImage, spec: DiskSpec
    ) -> str | None:
        """What makes the disk already at the path another one than `spec` wants, if anything."""
        ...

    def build(self, part: Path, base: CachedImage, spec: DiskSpec, runner: Runner) -> None:
        """Write the disk of `spec` on `base` into the temporary `part`."""
        ...

    def uses_base(self, path: Path, base: CachedImage, runner: Runner, limits: Limits) -> bool:
        """Whether the disk at `path` uses `base` (recorded formats only, never a probe)."""
        ...


class Qcow2Overlay:
    format: DiskFormat = "qcow2"
    references_base = True
    created_event = "overlay_created"

    def mismatch(
        self, existing: qemu_img.ImageInfo, base: CachedImage, spec: DiskSpec
    ) -> str | None:
        if existing.backing_filename == base.path and existing.virtual_size == spec.size_bytes:
            return None
        return (
            f"backing file {existing.backing_filename} and {existing.virtual_size} bytes; the "
            f"request wants {base.path} and {spec.size_bytes} bytes"
        )

    def build(self, part: Path, base: CachedImage, spec: DiskSpec, runner: Runner) -> None:
        qemu_img.create_overlay(
            runner, part, backing=Path(base.path), backing_format=base.format, size=spec.size_bytes
        )

    def uses_base(self, path: Path, base: CachedImage, runner: Runner, limits: Limits) -> bool:
        if not path.is_file() or diskinfo.read_format(path.parent, path.name) != "qcow2":
            return False
        return qemu_img.info(runner, path, "qcow2", limits).backing_filename == base.path


class RawCopy:
    format: DiskFormat = "raw"
    references_base = False
    created_event = "raw_disk_created"

    def mismatch(
        self, existing: qemu_img.ImageInfo, base: CachedImage, spec: DiskSpec
    ) -> str | None:
        if existing.virtual_size == spec.size_bytes:
            return None
        return f"{existing.virtual_size} bytes; the request wants {spec.size_bytes} bytes"

    def build(self, part: Path, base: CachedImage, spec: DiskSpec, runner: Runner) -> None:
        source = Path(base.path)
        if base.format == "raw":
            sparse_copy(runner, source, part)
        else:
            qemu_img.convert(
                runner,
                source,
                part,
                source_format=base.format,
                target_format="raw",
                cache_mode=cache_mode_for(part.parent),
            )
        if spec.size_bytes > base.virtual_size:
            qemu_img.resize(runner, part, fmt="raw", size=spec.size_bytes)

    def uses_base(self, path: Path, base: CachedImage, runner: Runner, limits: Limits) -> bool:
        return False


# The backends whose disks are files under the instances directory (rbd disks are clones in Ceph).
FileBackend = Literal["qcow2", "raw"]

BACKENDS: dict[FileBackend, DiskBackend] = {"qcow2": Qcow2Overlay(), "raw": RawCopy()}
