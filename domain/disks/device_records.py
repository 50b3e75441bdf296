"""The resource ledger: every directory, daemon, loop device and mount that the device steps
create for an instance disk, recorded before it is used.

One record per instance disk on a host, owned by the operation that claimed it (the caller's
task id). Steps append a resource to the record before they create it and fill in what they
learn afterwards (the loop device's name), so whatever moment a worker dies at, the record names
everything that might exist. Teardown releases the resources in reverse order and then drops the
record; a worker's janitor does the same for records whose worker is gone.

Domain code sees the `DeviceLedger` protocol; worker.stores.redis_ledger keeps records in Redis.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Resource(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def same(self, other: Resource) -> bool:
        """Whether `other` is this resource (possibly with more detail filled in)."""
        return type(self) is type(other) and self.identity() == other.identity()

    def identity(self) -> tuple[object, ...]:
        raise NotImplementedError


class WorkDir(_Resource):
    """The per-disk directory under the state dir (mount point, export file, pid file)."""

    kind: Literal["workdir"] = "workdir"
    path: str

    def identity(self) -> tuple[object, ...]:
        return (self.path,)


class StorageDaemon(_Resource):
    """A qemu-storage-daemon exporting the qcow2 overlay as a raw file over FUSE."""

    kind: Literal["storage_daemon"] = "storage_daemon"
    export: str
    pidfile: str

    def identity(self) -> tuple[object, ...]:
        return (self.export,)


class LoopDevice(_Resource):
    """A loop device over one partition of the raw view; `device` is known once attached."""

    kind: Literal["loop"] = "loop"
    backing: str
    offset: int
    size: int
    device: str | None = None

    def identity(self) -> tuple[object, ...]:
        return (self.backing, self.offset)


class Mount(_Resource):
    """The guest filesystem mounted at `mount_dir`: by fuse2fs or by the kernel."""

    kind: Literal["mount"] = "mount"
    mount_dir: str
    method: Literal["fuse2fs", "kernel"]

    def identity(self) -> tuple[object, ...]:
        return (self.mount_dir,)


Resource = Annotated[WorkDir | StorageDaemon | LoopDevice | Mount, Field(discriminator="kind")]


class DeviceRecord(BaseModel):
    """What exists for one instance disk on one host, in the order it was created."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    disk: str  # "<instance_id>/<disk_name>"
    owner: str  # the operation (caller's task id) that claimed the disk
    worker: str  # the worker that last acted on it
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    resources: tuple[Resource, ...] = ()

    def with_resource(self, resource: Resource) -> DeviceRecord:
        """This record with `resource` added, or updated in place if it is already there."""
        resources = list(self.resources)
        for index, existing in enumerate(resources):
            if existing.same(resource):
                resources[index] = resource
                break
        else:
            resources.append(resource)
        return self.model_copy(
            update={"resources": tuple(resources), "updated_at": datetime.now(UTC)}
        )

    def without(self, resource: Resource) -> DeviceRecord:
        return self.model_copy(
            update={"resources": tuple(r for r in self.resources if not r.same(resource))}
        )
