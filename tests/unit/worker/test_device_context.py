"""When a failing device step releases the disk (on its final failure, never before a retry),
and which records the janitor takes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import fakeredis
import pytest

from domain.core.errors import FilesystemRefused, SourceUnavailable
from domain.core.models import DiskSpec, ImageSource, PrepareRequest
from domain.core.runner import Runner
from domain.disks.device_records import DeviceRecord, WorkDir
from domain.guest.context import Claim
from worker.app.device_steps import device_context
from worker.app.janitor import orphans
from worker.app.runtime import Runtime
from worker.settings import Settings
from worker.stores.redis_ledger import RedisDeviceLedger
from worker.stores.redis_locks import RedisLockFactory


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


class FakeStep:
    """What device_context reads from a Celery task: its retry decision and worker name."""

    def __init__(self, retries_left: bool) -> None:
        self.retries_left = retries_left
        self.request = SimpleNamespace(hostname="w1@h")

    def will_retry(self, error: BaseException) -> bool:
        return self.retries_left and isinstance(error, SourceUnavailable)


def run_failing_step(
    client: fakeredis.FakeRedis, tmp_path: Path, step: FakeStep, error: Exception
) -> DeviceRecord | None:
    settings = Settings(state_dir=tmp_path)
    current = Runtime(
        settings=settings,
        redis=client,
        locks=RedisLockFactory(client, lease=5, renew_every=1, wait=1),
        runner=Runner(default_timeout=30),
    )
    request = PrepareRequest(
        image=ImageSource(url="http://x/y", image_id="y"),
        disk=DiskSpec(instance_id="vm", size_bytes=1),
    )
    ledger = RedisDeviceLedger(client, settings.host_id)

    def step_body() -> None:
        with device_context(step, request, "op-a", current) as ctx:  # type: ignore[arg-type]
            area = ctx.work_area("vm/disk")
            Claim(ledger, ledger.claim("vm/disk", "op-a", "w1")).note(WorkDir(path=str(area.path)))
            raise error

    with pytest.raises(type(error)):
        step_body()
    return ledger.get("vm/disk")


def test_a_step_about_to_retry_keeps_the_disk_s_devices(
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    kept = run_failing_step(client, tmp_path, FakeStep(retries_left=True), SourceUnavailable("x"))
    assert kept is not None and kept.owner == "op-a"


@pytest.mark.parametrize(
    ("retries_left", "error"),
    [(False, SourceUnavailable("no retries left")), (True, FilesystemRefused("permanent"))],
)
def test_a_step_failing_for_good_releases_the_disk_before_the_failure_is_stored(
    client: fakeredis.FakeRedis, tmp_path: Path, retries_left: bool, error: Exception
) -> None:
    assert run_failing_step(client, tmp_path, FakeStep(retries_left), error) is None


def test_janitor_takes_records_of_workers_that_do_not_answer() -> None:
    records = [
        DeviceRecord(disk="a/disk", owner="o1", worker="alive@h"),
        DeviceRecord(disk="b/disk", owner="o2", worker="dead@h"),
    ]
    assert [r.disk for r in orphans(records, {"alive@h"})] == ["b/disk"]
