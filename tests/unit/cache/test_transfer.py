"""Stalled and trickling sources against a real HTTP server on loopback: the minimum rate ends
them, and whatever interrupts the step (its soft time limit) stops the download at once."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from domain.cache.download import download
from domain.cache.networks import Network
from domain.cache.transfer import MinimumRate
from domain.core.errors import SourceTooSlow, SourceUnavailable
from tests.conftest import write_raw_image
from tests.support.waiting import wait_for
from worker.cli.demo.image_server import ImageServer

MiB = 2**20
KiB = 2**10


@dataclass(frozen=True)
class Policy:
    min_bytes_per_second: int = 64 * KiB
    rate_window_seconds: float = 1.5
    read_timeout_seconds: float = 60.0  # far longer than any of these tests may take
    connect_timeout_seconds: float = 2.0
    denied_networks: tuple[Network, ...] = ()
    allowed_schemes: tuple[str, ...] = ("http", "https")
    file_roots: tuple[Path, ...] = field(default_factory=tuple)
    max_image_bytes: int = 64 * MiB


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ImageServer]:
    (tmp_path / "served").mkdir()
    with ImageServer(tmp_path / "served") as running:
        yield running


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_a_trickling_source_ends_with_the_rate_error(server: ImageServer, tmp_path: Path) -> None:
    # Given a source that sends 1000 bytes, then one byte every half second
    write_raw_image(server.root / "slow.raw", size=8 * MiB, data=b"s" * 4096)
    server.trickle("slow.raw", after=1000, every=0.5)
    started = time.monotonic()
    # When it is downloaded with a minimum of 64 KiB/s over 1.5 s
    with pytest.raises(SourceTooSlow, match=r"bytes/s\), below the minimum of 65536") as slow:
        download(server.url("slow.raw"), tmp_path / "s.part", Policy())
    # Then the download ended by the rate (a transient error), long before the read timeout
    assert isinstance(slow.value, SourceUnavailable)
    assert "fetch.min_bytes_per_second" in str(slow.value)
    assert time.monotonic() - started < Policy().read_timeout_seconds
    wait_for(lambda: not reader_threads(), timeout=10, what="the reading thread to end")


def test_a_source_that_never_answers_ends_with_the_rate_error(tmp_path: Path) -> None:
    # Given a server that accepts the connection and never sends a byte
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    acceptor = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    acceptor.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.raw"
    try:
        with pytest.raises(SourceTooSlow, match=r"sent 0 bytes in the last"):
            download(url, tmp_path / "n.part", Policy())
        wait_for(lambda: not reader_threads(), timeout=10, what="the reading thread to end")
    finally:
        for connection in accepted:
            connection.close()
        listener.close()


def test_a_fast_source_passes_the_rate_check(
    server: ImageServer, tmp_path: Path, random_bytes: bytes
) -> None:
    source = write_raw_image(server.root / "fast.raw", size=16 * MiB, data=random_bytes)
    got = download(server.url("fast.raw"), tmp_path / "f.part", Policy(rate_window_seconds=0.2))
    assert got.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


def test_an_interrupted_download_stops_at_once(server: ImageServer, tmp_path: Path) -> None:
    # Given a download blocked on a source that sends one byte every half second, no minimum
    # rate, and the step's soft time limit arriving as SIGUSR1, as billiard's pool sends it
    write_raw_image(server.root / "stuck.raw", size=8 * MiB, data=b"x" * 4096)
    server.trickle("stuck.raw", after=1000, every=0.5)
    safety = threading.Timer(30, server.stop)  # the code before this fix waited for this
    safety.start()

    def soft_limit(signum: int, frame: FrameType | None) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGUSR1, soft_limit)
    alarm = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1))
    alarm.start()
    started = time.monotonic()
    try:
        # When the limit interrupts it
        with pytest.raises(SoftTimeLimitExceeded):
            download(server.url("stuck.raw"), tmp_path / "t.part", Policy(min_bytes_per_second=0))
        stopped_after = time.monotonic() - started
    finally:
        alarm.cancel()
        signal.signal(signal.SIGUSR1, previous)
        safety.cancel()
    # Then the download gave up within moments, not when the source ended, and its reading
    # thread, whose socket was shut down, ended too
    assert stopped_after < 10, f"the interrupted download took {stopped_after:.1f} s to stop"
    wait_for(lambda: not reader_threads(), timeout=10, what="the reading thread to end")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_is_measured_over_the_last_window() -> None:
    clock = Clock()
    rate = MinimumRate(100, 10, what="the source", clock=clock)
    for second in range(1, 30):  # 150 bytes/s for 30 s: above the minimum all along
        clock.now = second
        rate.arrived(150)
        rate.check()
    for second in (30, 31, 32):  # then nothing, but the last 10 s still brought 1050 bytes
        clock.now = second
        rate.check()
    clock.now = 33  # the last 10 s brought 900: too few
    with pytest.raises(SourceTooSlow, match=r"sent 900 bytes in the last 10 s \(90 bytes/s\)"):
        rate.check()


def test_no_minimum_means_no_check() -> None:
    clock = Clock()
    rate = MinimumRate(0, 1, what="the source", clock=clock)
    clock.now = 1000
    rate.check()
