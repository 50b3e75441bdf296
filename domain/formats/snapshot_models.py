"""Wire models of conversions and snapshots (imgprep.snapshot and the imgprep.convert step).

Like domain.core.models: frozen, unknown fields refused, changed only by adding optional fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from domain.core.models import (
    API_VERSION,
    ApiVersion,
    DiskBackendName,
    DiskFormat,
    DiskName,
    HostId,
    ImageId,
    InstanceId,
    RootedPath,
    WireModel,
)

SourceFormat = Literal["raw", "qcow2", "vmdk"]


class SnapshotRequest(WireModel):
    """imgprep.snapshot: extract an instance disk to a standalone image (Nova's cold snapshot).

    The guest must be stopped: a disk held open by a running guest is refused (ImageInUse).
    """

    api_version: ApiVersion = API_VERSION
    instance_id: InstanceId
    disk_name: DiskName = "disk"
    target: RootedPath | None = Field(
        default=None,
        description="Where the image goes: a path relative to the snapshots directory "
        "(IMGPREP_SNAPSHOTS_DIR), or an absolute path inside it; directories are created. "
        "Required by method extract.",
    )
    format: DiskFormat = "qcow2"
    compress: bool = Field(default=False, description="qcow2 only: compressed clusters (-c).")
    host: HostId | None = Field(
        default=None,
        description="Host that holds the instance disk; default: the worker that receives it.",
    )

    backend: DiskBackendName | None = Field(
        default=None,
        description="rbd: the disk is a clone in the host's Ceph cluster; null: a file disk.",
    )
    method: Literal["extract", "direct"] = Field(
        default="extract",
        description="extract: qemu-img convert to `target` (Nova's standard snapshot); direct "
        "(rbd only): an RBD snapshot of the disk cloned into the images pool, flattened and "
        "protected, named by `image_id` (Nova's direct_snapshot).",
    )
    image_id: ImageId | None = Field(
        default=None,
        description="method direct: the new image's id; a later prepare of this image id on "
        "the rbd backend clones it without a download.",
    )

    @model_validator(mode="after")
    def _compress_needs_qcow2(self) -> SnapshotRequest:
        if self.compress and self.format != "qcow2":
            raise ValueError("compress is only possible with format qcow2")
        return self

    @model_validator(mode="after")
    def _method_has_what_it_needs(self) -> SnapshotRequest:
        if self.method == "extract" and self.target is None:
            raise ValueError("method extract needs a target")
        if self.method == "direct":
            if self.backend != "rbd":
                raise ValueError('method direct needs backend "rbd"')
            if self.image_id is None:
                raise ValueError("method direct needs the new image's image_id")
        return self


class ConvertJob(WireModel):
    """imgprep.convert: one `qemu-img convert` between two paths under the configured roots."""

    kind: Literal["convert_job"] = "convert_job"
    source: str
    source_format: SourceFormat
    target: str
    target_format: DiskFormat
    compress: bool = False


class ConvertedImage(WireModel):
    """A standalone image written by imgprep.convert; the result of imgprep.snapshot."""

    kind: Literal["converted_image"] = "converted_image"
    api_version: ApiVersion = API_VERSION
    path: str
    format: DiskFormat
    virtual_size: int
    size_bytes: int = Field(description="Length of the file.")
    allocated_bytes: int = Field(description="Bytes the filesystem allocated (holes excluded).")
    sha256: str
    compressed: bool
    source: str
    source_format: SourceFormat
    cache_mode: Literal["none", "writeback"]


class RbdSnapshot(WireModel):
    """The result of imgprep.snapshot with method direct: a flattened image in the cluster's
    images pool with a protected snapshot, ready to be cloned (Glance stores `location`)."""

    kind: Literal["rbd_snapshot"] = "rbd_snapshot"
    api_version: ApiVersion = API_VERSION
    location: str = Field(description="rbd://<fsid>/<pool>/<image>/<snapshot>")
    image_id: str
    pool: str
    image: str
    snapshot: str
    virtual_size: int
    source: str = Field(description="The instance disk: rbd:<pool>/<image>.")
