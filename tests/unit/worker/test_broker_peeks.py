"""The bookkeeping of worker/delivery/broker_peeks.py, on connections that stand in for Redis's (a
socket pair each, so that readiness is real): which replies wake the channel, when a peek is sent
again, and that a peek whose connection went silent is replaced. The peeks against a real Redis are
in tests/integration/test_broker_peeks.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ReadOnlyError, ResponseError

from worker.delivery import broker_peeks
from worker.delivery.broker_peeks import PeekPoller, QueuePeeks, refused


class StandInConnection:
    """A connection whose replies the test decides; its socket is readable while one waits."""

    def __init__(self) -> None:
        self._sock, self.server = socket.socketpair()
        self.sent: list[tuple[object, ...]] = []
        self.replies: list[object] = []
        self.closed = False

    def connect(self) -> None:
        pass

    def send_command(self, *args: object) -> None:
        self.sent.append(args)

    def reply(self, value: object) -> None:
        self.replies.append(value)
        self.server.send(b"+")

    def read_response(self, disconnect_on_error: bool = True) -> object:
        self._sock.recv(1)
        value = self.replies.pop(0)
        if isinstance(value, Exception):
            raise value
        return value

    def disconnect(self) -> None:
        self.closed = True
        self._sock.close()
        self.server.close()


class Peeking:
    def __init__(self) -> None:
        self.connections: list[StandInConnection] = []
        self.poller = PeekPoller()
        self.woken = 0
        self.refusals: list[ResponseError] = []
        self.peeks = QueuePeeks(
            connect=self.connect,
            poller=self.poller,
            timeout=1.0,
            grace=0.0,
            on_message=self.wake,
            on_refused=self.refusals.append,
        )

    def connect(self) -> StandInConnection:
        self.connections.append(StandInConnection())
        return self.connections[-1]

    def wake(self) -> None:
        self.woken += 1

    def handle(self) -> None:
        """What the poller does with every readable peek (kombu's `get`, without a channel)."""
        for fd, _ in self.poller.poller.poll(0) or ():
            self.poller.handle_event(fd, 0)

    def close(self) -> None:
        self.peeks.close()


@pytest.fixture
def peeking() -> Iterator[Peeking]:
    made = Peeking()
    yield made
    made.close()


def blmove(key: str) -> tuple[object, ...]:
    return ("BLMOVE", key, key, "RIGHT", "RIGHT", 1.0)


def test_a_peek_is_sent_to_each_list_on_a_connection_of_its_own(peeking: Peeking) -> None:
    peeking.peeks.watch(["a", "b"])

    assert [c.sent for c in peeking.connections] == [[blmove("a")], [blmove("b")]]
    assert peeking.peeks.waiting == {"a", "b"}


def test_a_message_wakes_the_channel_and_its_list_is_not_peeked_again_until_asked(
    peeking: Peeking,
) -> None:
    peeking.peeks.watch(["a", "b"])
    first = peeking.connections[0]

    first.reply(b"a message")
    peeking.handle()

    assert peeking.woken == 1
    assert peeking.peeks.waiting == {"b"}
    assert first.sent == [blmove("a")]  # the list still holds it: a peek would return at once
    peeking.peeks.watch(["a", "b"])  # the channel asks again after a claim found nothing
    assert first.sent == [blmove("a"), blmove("a")]


def test_a_peek_that_timed_out_wakes_nobody(peeking: Peeking) -> None:
    peeking.peeks.watch(["a"])

    peeking.connections[0].reply(None)
    peeking.handle()

    assert peeking.woken == 0
    assert peeking.peeks.waiting == set()


def test_a_silent_peek_is_replaced_by_one_on_a_new_connection(
    peeking: Peeking, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a peek sent long ago that never got its reply (a half-open connection)
    peeking.peeks.watch(["a"])
    silent = peeking.connections[0]
    now = time.monotonic()
    monkeypatch.setattr(broker_peeks, "monotonic", lambda: now + 5.0)  # timeout 1 s, grace 0

    # When the channel next asks for its peeks
    peeking.peeks.watch(["a"])

    # Then the silent connection is closed and a new one peeks
    assert silent.closed
    assert len(peeking.connections) == 2
    assert peeking.connections[1].sent == [blmove("a")]


def test_a_list_no_longer_consumed_loses_its_peek(peeking: Peeking) -> None:
    peeking.peeks.watch(["a", "b"])

    peeking.peeks.watch(["a"])

    assert peeking.connections[1].closed
    assert peeking.peeks.waiting == {"a"}


def test_a_refusal_is_reported_and_a_passing_error_is_a_lost_connection(
    peeking: Peeking,
) -> None:
    peeking.peeks.watch(["a", "b"])

    peeking.connections[0].reply(NoPermissionError("this user has no permissions: blmove"))
    peeking.handle()
    assert [str(e) for e in peeking.refusals] == ["this user has no permissions: blmove"]

    peeking.connections[1].reply(ResponseError("UNBLOCKED force unblock (master -> replica?)"))
    with pytest.raises(RedisConnectionError, match="UNBLOCKED"):
        peeking.handle()
    assert peeking.peeks.waiting == set()
    assert all(c.closed for c in peeking.connections)


@pytest.mark.parametrize(
    ("error", "for_good"),
    [
        (ResponseError("unknown command 'BLMOVE', with args beginning with: "), True),
        (NoPermissionError("this user has no permissions to run the 'eval' command"), True),
        (ResponseError("UNBLOCKED force unblock from blocking operation"), False),
        (ReadOnlyError("You can't write against a read only replica."), False),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots"), False),
        (ResponseError("BUSY Redis is busy running a script"), False),
    ],
)
def test_only_a_command_refused_for_good_is_a_refusal(error: ResponseError, for_good: bool) -> None:
    assert refused(error) is for_good


def test_peeks_are_settled_while_all_wait_and_none_is_due_to_be_replaced(
    peeking: Peeking,
) -> None:
    # the event loop asks on every turn whether there is anything to do
    now = time.monotonic()
    assert not peeking.peeks.settled(now)

    peeking.peeks.watch(["a", "b"])
    assert peeking.peeks.settled(time.monotonic())
    assert not peeking.peeks.settled(time.monotonic() + 2.0)  # timeout 1 s, grace 0: check

    peeking.connections[0].reply(None)
    peeking.handle()
    assert not peeking.peeks.settled(time.monotonic())  # a peek to send again
