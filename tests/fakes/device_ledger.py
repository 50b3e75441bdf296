"""An in-memory device ledger (the DeviceLedger port) of one host."""

from __future__ import annotations

from domain.core.errors import DiskBusy
from domain.disks.device_records import DeviceRecord


class InMemoryDeviceLedger:
    def __init__(self) -> None:
        self.by_disk: dict[str, DeviceRecord] = {}

    def claim(self, disk: str, owner: str, worker: str) -> DeviceRecord:
        existing = self.by_disk.get(disk)
        if existing is None:
            existing = DeviceRecord(disk=disk, owner=owner, worker=worker)
        elif existing.owner != owner:
            raise DiskBusy(f"the devices of {disk} are held by operation {existing.owner}")
        record = existing.model_copy(update={"worker": worker})
        self.by_disk[disk] = record
        return record

    def get(self, disk: str) -> DeviceRecord | None:
        return self.by_disk.get(disk)

    def put(self, record: DeviceRecord) -> None:
        self.by_disk[record.disk] = record

    def drop(self, disk: str, owner: str) -> None:
        if disk in self.by_disk and self.by_disk[disk].owner == owner:
            del self.by_disk[disk]

    def records(self) -> list[DeviceRecord]:
        return list(self.by_disk.values())
