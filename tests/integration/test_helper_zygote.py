"""The helper's zygote on real processes: each operation runs in a forked child that holds only
its operation's capabilities; concurrent requests are each answered with their own reply; no
child is left (nor a zombie) after a burst; a child past the limit is killed; the zygote dies
with the helper, and the helper stops when its zygote dies.

The tests that fork a zygote from this test process replace helper.operations.run before the
fork: the zygote and its children run the replacement (forked, not imported again)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.privileges import HelperProcess, open_directory, unprivileged_user
from helper import capabilities, operations
from helper.protocol import IsLiveMount, Ping, Reply, Request, StopDaemons, WriteFiles
from helper.zygote import EXIT_ZYGOTE_EXITED, Zygote
from tests.conftest import need_root
from tests.support.processes import children, running
from tests.support.waiting import wait_for
from worker.privileges.helper_client import HelperClient

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    need_root()  # dropping capabilities from the bounding set needs CAP_SETPCAP


@contextlib.contextmanager
def started(limit: float = 120.0) -> Iterator[Zygote]:
    """A zygote forked from this process, stopped (and reaped) after."""
    zygote = Zygote.start(None, 60.0, limit)
    try:
        yield zygote
    finally:
        zygote.close()


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    with started() as made:
        yield made


def run_all(zygote: Zygote, requests: list[Request]) -> list[Reply]:
    """Run `requests` at once, each from its own thread (as the server's threads do)."""
    replies: list[Reply | None] = [None] * len(requests)

    def one(index: int) -> None:
        replies[index] = zygote.run(requests[index])

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert all(reply is not None for reply in replies), "a request was not answered"
    return [reply for reply in replies if reply is not None]


def test_each_child_holds_only_its_operations_capabilities(zygote: Zygote, tmp_path: Path) -> None:
    # Given requests of operations with different capabilities (harmless ones: nothing to find)
    requests: list[Request] = [
        Ping(),
        IsLiveMount(target=str(tmp_path / "not-mounted")),
        StopDaemons(program="fuse2fs", path=str(tmp_path / "none"), timeout=1),
        WriteFiles(root=str(tmp_path / "no-guest"), disk="disk", files=()),
    ]
    for request in requests:
        # When each runs in a child of the zygote
        reply = zygote.run(request)
        # Then the child held exactly its operation's capabilities, bounding set included
        expected = [capabilities.NAMES[cap] for cap in sorted(operations.CAPABILITIES[request.op])]
        assert reply.capabilities == {"effective": expected, "bounding": expected}, request.op
    # (write_files, which writes into guests, holds no CAP_SYS_ADMIN, and ran: no guest there)
    assert reply.capabilities is not None and "CAP_SYS_ADMIN" not in reply.capabilities["bounding"]
    assert reply.error is not None and "cannot write the guest root" in reply.error.message


def test_concurrent_requests_each_get_their_own_reply_and_no_child_is_left(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given an operation that answers with its own target, once all of the burst are running
    # (so they can only finish if they run at the same time)
    burst = 12

    def echo(request: Request, timeout: float, owner: tuple[int, int] | None) -> Reply:
        assert isinstance(request, IsLiveMount)
        (tmp_path / f"started-{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("started-*"))) < burst and time.monotonic() < deadline:
            time.sleep(0.01)
        return Reply(ok=True, result=request.target)

    monkeypatch.setattr(operations, "run", echo)
    with started() as zygote:
        # When a burst of requests runs at once
        targets = [f"/work-area/{index}" for index in range(burst)]
        replies = run_all(zygote, [IsLiveMount(target=target) for target in targets])

        # Then each got its own answer, from its own child
        assert [reply.result for reply in replies] == targets
        assert len(list(tmp_path.glob("started-*"))) == burst
        # and once they have exited the zygote has no child left, not even a zombie
        wait_for(lambda: not children(zygote.pid), timeout=60, what="the children reaped")
        assert running(zygote.pid)


def hanging(pidfile: Path) -> Callable[[Request, float, tuple[int, int] | None], Reply]:
    """An operation that never ends, writing its process's pid to `pidfile` first."""

    def hang(request: Request, timeout: float, owner: tuple[int, int] | None) -> Reply:
        pidfile.write_text(str(os.getpid()))
        threading.Event().wait()
        raise AssertionError("unreachable")

    return hang


def test_a_child_past_the_limit_is_killed_and_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given an operation that never ends, and a zygote whose server waits 10 s for a reply
    monkeypatch.setattr(operations, "run", hanging(tmp_path / "pid"))
    with started(limit=10.0) as zygote:
        # When it runs
        reply = zygote.run(Ping())

        # Then the reply says it did not finish
        assert not reply.ok and reply.error is not None
        assert reply.error.error_class == "DeviceError"
        assert "did not finish within the helper's limit" in reply.error.message
        # and its process is gone (killed, and reaped by the zygote)
        pid = int((tmp_path / "pid").read_text())
        wait_for(lambda: not running(pid), timeout=60, what="the child to be killed")
        wait_for(lambda: not children(zygote.pid), timeout=60, what="the child reaped")


def test_a_child_ends_with_its_zygote_and_the_caller_is_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given an operation running in a child of the zygote
    monkeypatch.setattr(operations, "run", hanging(tmp_path / "pid"))
    with started() as zygote:
        replies = []
        caller = threading.Thread(target=lambda: replies.append(zygote.run(Ping())))
        caller.start()
        pid = int(wait_for(lambda: _read(tmp_path / "pid"), timeout=60, what="the child"))

        # When the zygote is SIGKILLed
        os.kill(zygote.pid, signal.SIGKILL)

        # Then the child ends too (its parent-death signal), and its caller is told
        wait_for(lambda: not running(pid), timeout=60, what="the child to end")
        caller.join(timeout=60)
        (reply,) = replies
        assert reply.error is not None and "ended without a reply" in reply.error.message


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() and path.read_text() else None


@pytest.fixture
def helper() -> Iterator[HelperProcess]:
    """A standalone helper (`python -m helper`), stopped by its pid."""
    unprivileged_user()
    with open_directory("zygote") as root, HelperProcess.start(root) as started:
        yield started


def zygote_of(helper: HelperProcess) -> int:
    (zygote,) = children(helper.process.pid)  # forked at start, before any operation
    return zygote


def test_operations_through_the_helper_run_in_children_of_its_zygote(
    helper: HelperProcess,
) -> None:
    # Given a helper and its zygote
    zygote = zygote_of(helper)
    client = HelperClient(helper.socket_path)
    work_area = helper.devices_dir / "vm" / "disk"

    # When callers ask it at once whether work areas are mounted
    answers: list[bool] = []
    threads = [
        threading.Thread(target=lambda: answers.append(client.is_live_mount(work_area / "root")))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)

    # Then each is answered (nothing mounted there), and the helper logged each run with the
    # operation's capabilities
    assert answers == [False] * 6
    runs = [
        json.loads(line)
        for line in helper.log_path.read_text().splitlines()
        if '"operation_run"' in line
    ]
    assert len(runs) == 6
    assert all(run["capabilities"] == [] for run in runs)
    assert all(run["bounding"] == [] for run in runs)
    # and the same zygote is there, with no child left
    assert zygote_of(helper) == zygote
    wait_for(lambda: not children(zygote), timeout=60, what="the children reaped")


def test_a_helper_whose_zygote_dies_stops_with_a_failure(helper: HelperProcess) -> None:
    # Given a helper and its zygote
    zygote = zygote_of(helper)

    # When something kills the zygote
    os.kill(zygote, signal.SIGKILL)

    # Then the helper says so and exits with its own status, for its supervisor to restart it
    assert helper.process.wait(timeout=60) == EXIT_ZYGOTE_EXITED
    assert "helper_zygote_exited" in helper.log_path.read_text()
    assert not running(zygote)
    assert not helper.socket_path.exists()


def test_the_zygote_dies_with_its_helper(helper: HelperProcess) -> None:
    # Given a helper and its zygote
    zygote = zygote_of(helper)

    # When the helper is SIGKILLed (nothing of it runs to stop the zygote)
    os.kill(helper.process.pid, signal.SIGKILL)
    helper.process.wait(timeout=60)

    # Then the zygote ends too (its parent-death signal; or the end of its control socket)
    wait_for(lambda: not running(zygote), timeout=60, what="the zygote to end")
