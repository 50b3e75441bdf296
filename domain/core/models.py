"""Wire models: what crosses a task boundary, as JSON (`model_dump(mode="json")`).

These are the API control planes program against (see schemas/ and README "Wire contract").
Change them only by adding optional fields, or by a new `api_version`.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from domain.core.publish import is_temporary_name
from domain.core.urls import MAX_URL_LENGTH, check_url

API_VERSION: Literal[1] = 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HOST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


def _path_component(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it becomes one path component)"
        )
    return value


# A name that is safe as one path component: no "/", cannot be "." or "..", no leading dot.
Name = Annotated[
    str,
    AfterValidator(_path_component),
    WithJsonSchema({"type": "string", "pattern": _NAME.pattern}),
]
InstanceId = Name


def _disk_name(value: str) -> str:
    # Beside each disk live its format record (disk.info) and its writers' temporaries
    # (<name>.part.<fence>, domain.core.publish).
    if value == "disk.info" or is_temporary_name(value):
        raise ValueError(
            "'disk.info' and names ending in '.part', '.converted' or either followed by "
            "'.<digits>' are reserved"
        )
    return value


DiskName = Annotated[
    Name,
    AfterValidator(_disk_name),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": _NAME.pattern,
            "not": {"anyOf": [{"const": "disk.info"}, {"pattern": r"\.part$"}]},
        }
    ),
]
# A host id names a queue (imgprep.host.<id>): what IMGPREP_HOST_ID accepts.
HostId = Annotated[str, StringConstraints(pattern=HOST_ID_PATTERN)]
# Image ids are hashed into cache keys, so any printable text is safe; control characters are not.
ImageId = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")
]
ImageUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_URL_LENGTH),
    AfterValidator(check_url),
]
# A path under a configured root (where it must lie is checked where it is used).
RootedPath = Annotated[
    str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Checksum = Annotated[
    str,
    BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
    StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$"),
]
DeclaredFormat = Literal["auto", "raw", "qcow2", "vmdk"]
DiskFormat = Literal["raw", "qcow2"]
Backend = Literal["qcow2", "raw", "rbd"]
# Where an instance disk lives when it is not a file on its host: "rbd", a clone in Ceph.
DiskBackendName = Literal["rbd"]


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


def _array(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


# On every tuple field of a wire model: a JSON array becomes the tuple a frozen model keeps
# (strict mode takes only tuples).
FROM_JSON_ARRAY = BeforeValidator(_array)


ApiVersion = Annotated[Literal[1], BeforeValidator(_not_bool)]


class WireModel(BaseModel):
    """Frozen and strict: a typo in a request is an error, not a default, and a value of the
    wrong JSON type is an error, not a conversion (`true` is not 1, "10" is not 10)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ImageSource(WireModel):
    """Where an image comes from and what the caller promises about it."""

    url: ImageUrl
    image_id: ImageId
    checksum: Checksum | None = None
    declared_format: DeclaredFormat = "auto"


class DiskSpec(WireModel):
    """The instance disk to create."""

    instance_id: InstanceId
    disk_name: DiskName = "disk"
    size_bytes: int = Field(gt=0, le=64 * 2**40)
    backend: Backend = "qcow2"


# File injection: requests travel through the broker, so what they carry stays small.
MAX_INJECT_FILES = 64
MAX_INJECT_BYTES = 256 * 2**10  # decoded, all files together
MAX_PARTITION = 255


def _guest_path(value: str) -> str:
    parts = value.split("/")
    if (
        not value.startswith("/")
        or len(value) > 4096
        or "\x00" in value
        or any(part in ("", ".", "..") or len(part.encode()) > 255 for part in parts[1:])
    ):
        raise ValueError(
            "must be an absolute guest path such as /etc/motd: no '.', '..' or empty components"
        )
    return value


def _octal_mode(value: object) -> object:
    return int(value, 8) if isinstance(value, str) and value.isdigit() else value


GuestPath = Annotated[str, AfterValidator(_guest_path)]
FileMode = Annotated[int, BeforeValidator(_octal_mode), Field(ge=0, le=0o7777)]
# none: the whole disk is a filesystem; a number; auto: the one Linux partition, else the largest.
PartitionNumber = Annotated[int, Field(strict=True, ge=1, le=MAX_PARTITION)]
PartitionChoice = Literal["auto", "none"] | PartitionNumber


class FileInjection(WireModel):
    """A file to write into the guest filesystem: its path, content and permission bits."""

    path: GuestPath
    content: Annotated[str, StringConstraints(max_length=(MAX_INJECT_BYTES * 4) // 3 + 4)]
    encoding: Literal["text", "base64"] = "text"
    mode: FileMode = 0o644

    @model_validator(mode="after")
    def _decodes(self) -> FileInjection:
        self.data()
        return self

    def data(self) -> bytes:
        """The bytes to write: the UTF-8 text, or the decoded base64."""
        if self.encoding == "text":
            return self.content.encode("utf-8")
        try:
            return base64.b64decode(self.content, validate=True)
        except binascii.Error as error:
            raise ValueError(f"content is not valid base64: {error}") from None


class PrepareRequest(WireModel):
    """imgprep.prepare_disk: fetch the image into the cache and create the instance disk."""

    api_version: ApiVersion = API_VERSION
    image: ImageSource
    disk: DiskSpec
    host: HostId | None = Field(
        default=None,
        description="Host whose queue runs the host-local steps; default: the worker that "
        "receives the request.",
    )
    inject: Annotated[tuple[FileInjection, ...], FROM_JSON_ARRAY] = Field(
        default=(),
        max_length=MAX_INJECT_FILES,
        description="Files to write into the guest filesystem once the disk exists.",
    )
    partition: PartitionChoice = Field(
        default="auto",
        description="Where the guest filesystem is: none (whole disk), a partition number, or "
        "auto (the only Linux partition, else the largest).",
    )

    @model_validator(mode="after")
    def _rbd_sources_need_rbd_disks(self) -> PrepareRequest:
        if self.image.url.lower().startswith("rbd:") and self.disk.backend != "rbd":
            raise ValueError(
                'an rbd:// image source can only be cloned: it needs disk.backend "rbd"'
            )
        return self

    @model_validator(mode="after")
    def _injection_is_small(self) -> PrepareRequest:
        total = sum(len(item.data()) for item in self.inject)
        if total > MAX_INJECT_BYTES:
            raise ValueError(
                f"files to inject hold {total} bytes; at most {MAX_INJECT_BYTES} are accepted"
            )
        paths = [item.path for item in self.inject]
        if len(set(paths)) != len(paths):
            raise ValueError("a guest path appears twice in inject")
        return self


class CachedImage(WireModel):
    """An image published in the shared cache: `<cache_dir>/<key>`; for the rbd backend, the
    image imported into the cluster's images pool, `path` its `rbd://fsid/pool/image/snap`
    location."""

    kind: Literal["cached_image"] = "cached_image"
    key: str
    image_id: str
    path: str
    format: str
    virtual_size: int
    source_sha256: str


class InstanceDisk(WireModel):
    """A disk created for an instance: `<instances_dir>/<instance_id>/<disk_name>`; for the rbd
    backend, the clone `<instance_id>_<disk_name>` in the cluster's pool (`path`
    `rbd:<pool>/<image>`, `backing_file` its parent's `rbd://` location)."""

    kind: Literal["instance_disk"] = "instance_disk"
    host: HostId
    instance_id: InstanceId
    disk_name: DiskName
    path: str
    format: DiskFormat
    virtual_size: int
    backing_file: str | None = None
    backing_format: str | None = None
    backend: Backend | None = Field(
        default=None, description="Set for rbd disks; null: a file disk (qcow2 or raw)."
    )


class InjectedFile(WireModel):
    """A file written into the guest: where, how many bytes, which mode, and their sha256."""

    path: str
    size: int
    mode: int
    sha256: str


class GuestFilesystem(WireModel):
    """The guest filesystem files were injected into, and how it was mounted."""

    partition: int | None  # None: the whole disk
    filesystem: str
    mount: Literal["fuse2fs", "kernel"]


class PreparedDisk(WireModel):
    """The result of imgprep.prepare_disk: the instance disk and the cached base it came from."""

    kind: Literal["prepared_disk"] = "prepared_disk"
    api_version: ApiVersion = API_VERSION
    disk: InstanceDisk
    base: CachedImage
    guest: GuestFilesystem | None = None  # set when files were injected
    injected: Annotated[tuple[InjectedFile, ...], FROM_JSON_ARRAY] = ()


class DeleteDiskRequest(WireModel):
    """imgprep.delete_disk: remove an instance disk and drop its reference to its base image."""

    api_version: ApiVersion = API_VERSION
    instance_id: InstanceId
    disk_name: DiskName = "disk"
    backend: DiskBackendName | None = Field(
        default=None,
        description="rbd: the disk is a clone in the host's Ceph cluster (removed with its "
        "snapshots); null: a file disk on the host.",
    )
    host: HostId | None = Field(
        default=None,
        description="Host that holds the disk; default: the worker that receives the request.",
    )


class DeletedDisk(WireModel):
    """The result of imgprep.delete_disk; deleting a disk that is not there is not an error."""

    kind: Literal["deleted_disk"] = "deleted_disk"
    api_version: ApiVersion = API_VERSION
    host: HostId
    instance_id: InstanceId
    disk_name: DiskName
    path: str
    existed: bool
    released_bases: list[str] = Field(
        default=[], description="Cache keys this disk no longer holds in use."
    )


class EvictCacheRequest(WireModel):
    """imgprep.evict_cache: age out unused base images (what Celery beat runs periodically).

    Unset fields take the worker's settings (image_cache.*)."""

    api_version: ApiVersion = API_VERSION
    backend: DiskBackendName | None = Field(
        default=None,
        description="rbd: age the images imported into the Ceph cluster's images pool; null: "
        "the file cache.",
    )
    dry_run: bool = False
    remove_unused_original_minimum_age_seconds: float | None = Field(default=None, ge=0)
    max_bytes: int | None = Field(default=None, ge=0, description="0: no size cap")


class CacheEviction(WireModel):
    """One cache entry the cache manager removed, or would remove in a dry run."""

    key: str
    image_id: str | None
    size_on_disk: int
    last_used: float
    reason: Literal["unused", "over_size_cap", "orphaned"]


class CacheEvictionReport(WireModel):
    """The result of imgprep.evict_cache."""

    kind: Literal["cache_eviction_report"] = "cache_eviction_report"
    api_version: ApiVersion = API_VERSION
    host: HostId
    dry_run: bool
    evicted: list[CacheEviction]
    kept_in_use: list[str] = Field(description="Keys of entries some instance disk still uses.")
    skipped_busy: list[str] = Field(description="Keys whose lock was held (being fetched).")
    dropped_references: list[str] = Field(
        default=[], description="Stale references removed: '<key> <holder>'."
    )
    bytes_before: int
    bytes_after: int
