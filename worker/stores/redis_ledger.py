"""The resource ledger in Redis: one hash per host, one field per instance disk.

`imgprep:devices:<host>` maps `<instance_id>/<disk_name>` to the JSON DeviceRecord of that
disk. The hash disappears with its last field, so a host with nothing mounted has no key. The
records have no expiry on purpose: a record is dropped only after its resources were released
(by teardown or the janitor), never because time passed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
from pydantic import ValidationError

from domain.core.errors import CoordinationUnavailable, DeviceError, DiskBusy
from domain.disks.device_records import DeviceRecord
from worker.stores.lua import script

DEVICES_PREFIX = "imgprep:devices:"

_DROP = script("worker.stores", "ledger_drop.lua")

T = TypeVar("T")


class RedisDeviceLedger:
    """The DeviceLedger of one host."""

    def __init__(self, client: redis.Redis, host: str) -> None:
        self.client = client
        self.key = DEVICES_PREFIX + host
        self._drop = client.register_script(_DROP)

    def claim(self, disk: str, owner: str, worker: str) -> DeviceRecord:
        fresh = DeviceRecord(disk=disk, owner=owner, worker=worker)
        while True:
            if self._call(self.client.hsetnx, self.key, disk, fresh.model_dump_json()):
                return fresh
            raw = self._call(self.client.hget, self.key, disk)
            if raw is None:
                continue  # released between the two calls: try again
            existing = _parse(raw)
            if existing is None:
                raise DeviceError(
                    f"the device record of {disk} in {self.key} is unreadable; release the "
                    "disk's devices by hand and delete the field"
                )
            if existing.owner != owner:
                raise DiskBusy(
                    f"the devices of {disk} are held by operation {existing.owner} (worker "
                    f"{existing.worker}, since {existing.updated_at:%Y-%m-%d %H:%M:%S} UTC); "
                    "one operation mounts a disk at a time"
                )
            record = existing.model_copy(update={"worker": worker})
            self.put(record)
            return record

    def get(self, disk: str) -> DeviceRecord | None:
        raw = self._call(self.client.hget, self.key, disk)
        return _parse(raw) if raw else None

    def put(self, record: DeviceRecord) -> None:
        self._call(self.client.hset, self.key, record.disk, record.model_dump_json())

    def drop(self, disk: str, owner: str) -> None:
        self._call(self._drop, keys=[self.key], args=[disk, owner])

    def records(self) -> list[DeviceRecord]:
        raw = self._call(self.client.hgetall, self.key)
        parsed = [_parse(value) for value in raw.values()]
        return [record for record in parsed if record is not None]

    def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as error:
            raise CoordinationUnavailable(
                f"the device ledger in Redis is unreachable: {error}"
            ) from None


def _parse(raw: bytes | str) -> DeviceRecord | None:
    try:
        return DeviceRecord.model_validate_json(raw)
    except ValidationError:
        return None
