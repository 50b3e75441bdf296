"""Blocking peeks at a channel's queues, each on a Redis connection of its own, polled beside
kombu's (worker/delivery/broker.py): how an idle worker learns within a round trip that a message
waits on any of its queues, without taking it.

A peek is `BLMOVE key key RIGHT RIGHT timeout`: the list rotated onto itself, so it returns the
message it saw and leaves it where it was (on a list of one message, nothing moves at all). BLMOVE
watches one list, and a connection blocked in it can do nothing else, so each watched list (a
queue and each of its priority lists) has a connection to itself. Redis answers a blocked client
in the same event-loop turn as the push that woke it, whatever its `hz`; only a block that times
out waits for the server's clock, and nothing here waits for a timeout any more.

A peek that saw a message tells the channel (`on_message`); the channel then claims on its own
connection (pop and record in one step) and sends that list no peek until a claim has found all
its lists empty: a peek sent to a list that still holds a message would return at once, again
and again. A peek that times out is sent again; one without a reply for `timeout + grace`
seconds (a half-open connection) is replaced. A lost connection is raised to the caller, as a
lost BRPOP connection is: the worker's consumer then reconnects and restores what it held.

The sockets are polled by the worker's event loop once the transport is registered with one
(`PeekPoller.use_loop`), else by kombu's own poll in `drain_events`.
"""

from __future__ import annotations

import contextlib
import functools
import select
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import monotonic
from typing import Any

import structlog
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError

log = structlog.get_logger(__name__)


def refused(error: ResponseError) -> bool:
    """Whether Redis refuses the command for good (a Redis older than 6.2 has no BLMOVE; an ACL
    forbids it or scripts), rather than failing it for the moment (BUSY, LOADING, MISCONF, a
    master turned replica unblocking its clients, ...)."""
    return isinstance(error, NoPermissionError) or str(error).lower().startswith("unknown command")


def as_connection_error(error: ResponseError, what: str) -> RedisConnectionError:
    """A passing refusal as the lost connection it amounts to: the consumer reconnects."""
    return RedisConnectionError(f"{what} failed, reconnecting: {error}")


class PeekPoller(kombu_redis.MultiChannelPoller):
    """kombu's poller of a transport's channels, which also polls their peeks: on the worker's
    event loop once registered with one, else in `get` (kombu's `drain_events`)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.loop: Any = None
        self._peek_readers: dict[int, Callable[[], None]] = {}

    def use_loop(self, loop: Any) -> None:
        """Poll the peeks on `loop` (the worker's event loop) from now on."""
        self.loop = loop
        for fd, on_readable in self._peek_readers.items():
            loop.add_reader(fd, on_readable)

    def add_peek(self, fd: int, on_readable: Callable[[], None]) -> None:
        self._peek_readers[fd] = on_readable
        if self.loop is not None:
            self.loop.add_reader(fd, on_readable)
        else:
            self.poller.register(fd, self.eventflags)

    def remove_peek(self, fd: int) -> None:
        """Stop polling `fd`; call it before its socket closes (the number may be reused)."""
        if self._peek_readers.pop(fd, None) is None:
            return
        with contextlib.suppress(OSError, ValueError, KeyError):
            if self.loop is not None:
                self.loop.remove_reader(fd)
            else:
                self.poller.unregister(fd)

    def handle_event(self, fileno: int, event: int) -> Any:
        on_readable = self._peek_readers.get(fileno)
        if on_readable is not None and self.loop is None:
            on_readable()
            return None  # get() goes on: the claim is sent at its next call
        return super().handle_event(fileno, event)  # type: ignore[no-untyped-call]


@dataclass
class Peek:
    """One list watched on a connection of its own."""

    key: str
    connection: Any  # a redis-py connection (plain, TLS, Unix or Sentinel-managed)
    fd: int
    sent_at: float | None = None  # a BLMOVE waits for its reply since


class QueuePeeks:
    """A peek waiting on each list a channel consumes, whose replies wake the channel."""

    def __init__(
        self,
        *,
        connect: Callable[[], Any],
        poller: PeekPoller,
        timeout: float,
        grace: float,
        on_message: Callable[[], None],
        on_refused: Callable[[ResponseError], None],
    ) -> None:
        self._connect = connect
        self._poller = poller
        self.timeout = timeout  # of each BLMOVE, seconds
        self.grace = grace  # past the timeout, before a peek without a reply is replaced
        self._on_message = on_message
        self._on_refused = on_refused
        self._peeks: dict[str, Peek] = {}
        # Until when `watch` has nothing to do: every peek waits, none is due to be replaced.
        # The event loop asks on every turn, so the answer must be cheap.
        self._settled_until = float("-inf")

    @property
    def waiting(self) -> set[str]:
        """The lists with a peek sent and not answered yet."""
        return {key for key, peek in self._peeks.items() if peek.sent_at is not None}

    def settled(self, now: float) -> bool:
        """Whether every peek `watch` last asked for still waits, none due to be replaced."""
        return now < self._settled_until

    def watch(self, keys: Iterable[str]) -> None:
        """Have a peek wait on each of `keys` (sent now where none waits, replaced where one has
        had no reply for too long), and none on any other list."""
        wanted = list(dict.fromkeys(keys))
        for key in set(self._peeks) - set(wanted):
            self._close(self._peeks.pop(key))
        now = monotonic()
        for key in wanted:
            peek = self._peeks.get(key)
            if peek is not None and peek.sent_at is not None:
                if now - peek.sent_at <= self.timeout + self.grace or _readable(peek.fd):
                    continue
                log.warning("broker_peek_replaced", queue=key, silent_seconds=now - peek.sent_at)
                self._close(self._peeks.pop(key))
                peek = None
            if peek is None:
                peek = self._open(key)
            peek.connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", self.timeout)
            peek.sent_at = monotonic()
        oldest = min((peek.sent_at or now for peek in self._peeks.values()), default=now)
        self._settled_until = oldest + self.timeout + self.grace

    def close(self) -> None:
        """Stop polling every peek and close its connection (never raises)."""
        self._settled_until = float("-inf")
        peeks, self._peeks = list(self._peeks.values()), {}
        for peek in peeks:
            self._close(peek)

    def _open(self, key: str) -> Peek:
        connection = self._connect()
        connection.connect()
        fd = connection._sock.fileno()
        peek = Peek(key, connection, fd)
        self._peeks[key] = peek
        self._poller.add_peek(fd, functools.partial(self._on_readable, peek))
        return peek

    def _close(self, peek: Peek) -> None:
        self._poller.remove_peek(peek.fd)
        with contextlib.suppress(Exception):  # closing a broken connection
            peek.connection.disconnect()

    def _on_readable(self, peek: Peek) -> None:
        if self._peeks.get(peek.key) is not peek:
            return  # closed, replaced: an event read before it was
        self._settled_until = float("-inf")  # this peek waits no more
        try:
            reply = peek.connection.read_response(disconnect_on_error=False)
        except ResponseError as error:
            del self._peeks[peek.key]
            self._close(peek)
            if refused(error):
                self._on_refused(error)
                return
            raise as_connection_error(error, f"peek at {peek.key!r}") from error
        except BaseException:
            del self._peeks[peek.key]
            self._close(peek)
            raise
        peek.sent_at = None
        if reply is not None:
            self._on_message()


def _readable(fd: int) -> bool:
    """Whether `fd` has something to read now (a reply the loop has not handled yet)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
