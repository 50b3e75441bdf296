"""A channel closed while it waits for work (worker/broker.py): kombu reads the reply of the
command it sent before closing, after the worker cancelled its consumers, so a channel that
watches no queue any more must still take that reply without failing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection

from tests.support.waiting import wait_for
from worker.broker import Transport
from worker.harness.redis_server import RedisServer, free_port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", free_port()).start()
    yield server
    server.stop()


def test_a_channel_closed_after_its_consumer_was_cancelled_mid_peek_closes(
    redis_server: RedisServer,
) -> None:
    # Given a channel consuming an empty queue, so that it watches it with a peek (BLMOVE)
    connection: Any = Connection(  # type: ignore[no-untyped-call]
        redis_server.url, transport=Transport, transport_options={"brpop_timeout": 3}
    )
    channel = connection.channel()
    channel.queue_declare("idle")
    channel.basic_consume("idle", no_ack=False, callback=lambda message: None, consumer_tag="c")

    # (the claim finds nothing, so the next command is a peek, sent and blocking in Redis)
    def peeking() -> bool:
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.05)
        return channel._pending == "peek" and bool(channel._in_poll)

    wait_for(peeking, timeout=30, what="the channel to wait with a peek")

    # When the consumer is cancelled (a worker's warm shutdown) and the channel closed while
    # the peek's reply is still to be read
    channel.basic_cancel("c")
    channel.close()

    # Then it closed (no IndexError reading the reply with no queue left to watch)
    assert channel.closed
    connection.release()
