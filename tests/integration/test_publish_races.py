"""Two holders of one real lease lock on the real redis-server, one of them paused past its
lease at the worst moments of publishing (issue 11, defect 1). The paused one is a real process
stopped with SIGSTOP right after its fence check, or a thread held between its two renames;
the other proceeds, and the paused one resumes while the other's file is half written.

Whatever the interleaving, what ends under the final names is one holder's complete file (and
its own record), the paused holder fails with LockLost, and no temporary is left."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest
import redis

import domain.core.fileops
import domain.core.publish
from domain.core.errors import LockLost
from domain.core.publish import Staged, publish_once
from harness.redis_server import RedisServer
from tests.integration.conftest import unique
from tests.support.waiting import wait_for
from worker.stores.redis_locks import LOCK_PREFIX, LeaseLock

MiB = 2**20
PAUSED_LEASE = 1.0  # seconds; the paused holder's lease lapses quickly


def stamp(path: Path) -> dict[str, int]:
    """What a record says of its file (domain.core.publish.FileStamp), computed here on its own."""
    stat = path.stat()
    return {"size": stat.st_size, "inode": stat.st_ino}


def record_path(target: Path) -> Path:
    return target.with_name(target.name + ".json")


def holder_bytes(holder: str) -> bytes:
    """4 MiB that differ from any other holder's."""
    return hashlib.sha256(holder.encode()).digest() * (4 * MiB // 32)


class PausedAfterFence:
    """A real LeaseLock whose holder stops itself (SIGSTOP) right after its first fence check
    passed, as a holder paused by the scheduler, a VM migration or a debugger would."""

    def __init__(self, lock: LeaseLock, marker: Path) -> None:
        self.lock = lock
        self.marker = marker
        self.paused = False

    @property
    def fence(self) -> int:
        return self.lock.fence

    def __enter__(self) -> PausedAfterFence:
        self.lock.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.lock.__exit__(exc_type, exc, tb)

    def ensure_held(self) -> None:
        self.lock.ensure_held()
        if not self.paused:
            self.paused = True
            self.marker.write_text("fenced")
            os.kill(os.getpid(), signal.SIGSTOP)


def _paused_holder(url: str, name: str, target: str, workdir: str, with_record: bool) -> None:
    """Run in a process of its own: publish `target` holding `name`, pausing after the fence;
    write what became of it to `<workdir>/outcome`."""
    lock = LeaseLock(redis.Redis.from_url(url), name, lease=PAUSED_LEASE, renew_every=0.3, wait=30)
    lease = PausedAfterFence(lock, Path(workdir) / "fenced")

    def stage(part: Path) -> Staged[str]:
        part.write_bytes(holder_bytes("A"))
        if not with_record:
            return Staged(file=part, result="A")
        record = json.dumps({"holder": "A", "file": stamp(part)})
        return Staged(file=part, result="A", record=record)

    try:
        kwargs = {"with_record": True} if with_record else {}
        publish_once(Path(target), find=lambda: None, lease=lease, stage=stage, **kwargs)  # type: ignore[arg-type]
        outcome = "published"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    (Path(workdir) / "outcome").write_text(outcome)


def find_entry(target: Path) -> Callable[[], str | None]:
    """The holder whose complete entry is at `target`: its record describes the file there."""

    def find() -> str | None:
        try:
            record = json.loads(record_path(target).read_text())
        except FileNotFoundError:
            return None
        try:
            matches = stamp(target) == record["file"]
        except FileNotFoundError:
            return None
        return str(record["holder"]) if matches else None

    return find


class HalfWriting:
    """Holder B: writes half of its file, lets the test resume the paused holder, then the rest."""

    def __init__(self, with_record: bool) -> None:
        self.with_record = with_record
        self.half_written = threading.Event()
        self.go_on = threading.Event()
        self.result: str | None = None
        self.error: BaseException | None = None

    def stage(self, part: Path) -> Staged[str]:
        data = holder_bytes("B")
        with open(part, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            self.half_written.set()
            assert self.go_on.wait(60)
            handle.write(data[len(data) // 2 :])
        if not self.with_record:
            return Staged(file=part, result="B")
        record = json.dumps({"holder": "B", "file": stamp(part)})
        return Staged(file=part, result="B", record=record)

    def run(self, server: RedisServer, name: str, target: Path) -> None:
        lock = LeaseLock(server.client(), name, lease=5.0, renew_every=1.0, wait=30)
        kwargs = {"with_record": True} if self.with_record else {}
        try:
            self.result = publish_once(
                target,
                find=find_entry(target) if self.with_record else lambda: None,
                lease=lock,
                stage=self.stage,
                **kwargs,  # type: ignore[arg-type]
            )
        except BaseException as error:
            self.error = error


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "cache").mkdir()
    return tmp_path


@pytest.mark.parametrize("with_record", [False, True], ids=["file", "file+record"])
def test_a_holder_paused_after_its_fence_never_publishes_the_next_holder_s_part(
    redis_server: RedisServer, workdir: Path, with_record: bool
) -> None:
    name = f"cache:{unique('race')}"
    target = workdir / "cache" / "entry"
    client = redis_server.client()
    # Given holder A, a real process, stopped right after its fence check passed
    context = multiprocessing.get_context("spawn")
    paused = context.Process(
        target=_paused_holder,
        args=(redis_server.url, name, str(target), str(workdir), with_record),
    )
    paused.start()
    assert paused.pid is not None
    pid = paused.pid
    try:
        wait_for(
            lambda: (workdir / "fenced").exists() or (workdir / "outcome").exists(),
            timeout=60,
            what="A's fence check",
        )
        assert (workdir / "fenced").exists(), (workdir / "outcome").read_text()
        wait_for(lambda: process_state(pid) == "T", timeout=10, what="A to stop")
        # and its lease lapsed (its renewal thread is stopped with it)
        wait_for(
            lambda: not client.exists(LOCK_PREFIX + name), timeout=10, what="A's lease to lapse"
        )

        # When holder B takes the lock and has written half of its file ...
        b = HalfWriting(with_record)
        thread = threading.Thread(target=b.run, args=(redis_server, name, target))
        thread.start()
        assert b.half_written.wait(60)
        # ... and A resumes and runs to its end
        os.kill(pid, signal.SIGCONT)
        paused.join(timeout=60)
        outcome = (workdir / "outcome").read_text()

        # Then A published nothing (B's half file above all) and failed with LockLost
        assert not target.exists(), f"a partial file was published: {target.stat().st_size}"
        assert outcome.startswith("LockLost"), outcome
    finally:
        if paused.is_alive():
            os.kill(pid, signal.SIGCONT)
            paused.join(timeout=30)
    # And B, once done, published its own complete file (and record), nothing else is left
    b.go_on.set()
    thread.join(timeout=60)
    assert b.error is None and b.result == "B"
    assert (
        hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(holder_bytes("B")).digest()
    )
    expected = ["entry", "entry.json"] if with_record else ["entry"]
    assert sorted(p.name for p in target.parent.iterdir()) == expected
    if with_record:
        assert find_entry(target)() == "B"
    assert not client.exists(LOCK_PREFIX + name)


def test_a_holder_paused_between_its_record_and_its_file_leaves_a_record_the_next_removes(
    redis_server: RedisServer, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"cache:{unique('race')}"
    target = workdir / "cache" / "entry"
    client = redis_server.client()
    a = LeaseLock(client, name, lease=5.0, renew_every=1.0, wait=30)
    between = threading.Event()
    resume = threading.Event()
    real_rename = domain.core.fileops.rename_new

    # Given holder A held (like a paused process) right after it renamed its record into place
    def rename_then_pause(source: Path, destination: Path) -> None:
        real_rename(source, destination)
        if threading.current_thread().name == "holder-A" and destination.name.endswith(".json"):
            between.set()
            assert resume.wait(60)

    monkeypatch.setattr(domain.core.publish, "rename_new", rename_then_pause)

    def stage_a(part: Path) -> Staged[str]:
        part.write_bytes(holder_bytes("A"))
        record = json.dumps({"holder": "A", "file": stamp(part)})
        return Staged(file=part, result="A", record=record)

    outcome: list[BaseException | str] = []

    def run_a() -> None:
        try:
            outcome.append(
                publish_once(
                    target, find=find_entry(target), lease=a, stage=stage_a, with_record=True
                )
            )
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run_a, name="holder-A")
    thread.start()
    assert between.wait(60)
    assert record_path(target).exists() and not target.exists()
    # and its lease lapsed meanwhile
    a._stop_renewing()
    wait_for(lambda: not client.exists(LOCK_PREFIX + name), timeout=10, what="A's lease to lapse")

    # When holder B publishes the entry
    def stage_b(part: Path) -> Staged[str]:
        part.write_bytes(holder_bytes("B"))
        record = json.dumps({"holder": "B", "file": stamp(part)})
        return Staged(file=part, result="B", record=record)

    b = LeaseLock(client, name, lease=5.0, renew_every=1.0, wait=30)
    assert (
        publish_once(target, find=find_entry(target), lease=b, stage=stage_b, with_record=True)
        == "B"
    )
    # and A resumes
    resume.set()
    thread.join(timeout=60)

    # Then A's record (without a file) was removed by B, A could not complete its entry
    # (its temporary was gone) and failed with LockLost; the entry is B's, whole
    assert isinstance(outcome[0], LockLost), outcome
    assert find_entry(target)() == "B"
    assert target.read_bytes() == holder_bytes("B")
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry", "entry.json"]
    assert not client.exists(LOCK_PREFIX + name)
