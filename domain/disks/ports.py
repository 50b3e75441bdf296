"""What instance disks need from the runtime, as protocols: the device records of a host's
instance disks (`DeviceLedger`; worker.stores.redis_ledger), which the device steps write and
a disk's deletion reads. tests/fakes holds the in-memory one.
"""

from __future__ import annotations

from typing import Protocol

from domain.disks.device_records import DeviceRecord


class DeviceLedger(Protocol):
    """Records of one host's instance disks (worker.stores.redis_ledger.RedisDeviceLedger)."""

    def claim(self, disk: str, owner: str, worker: str) -> DeviceRecord:
        """The record of `disk` for `owner`, created if there is none; DiskBusy when another
        owner holds it."""
        ...

    def get(self, disk: str) -> DeviceRecord | None: ...

    def put(self, record: DeviceRecord) -> None:
        """Store `record`, replacing the one of its disk."""
        ...

    def drop(self, disk: str, owner: str) -> None:
        """Remove the record of `disk` if `owner` still holds it."""
        ...

    def records(self) -> list[DeviceRecord]:
        """Every record of this host, for the janitor."""
        ...
