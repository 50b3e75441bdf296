"""A channel closed while it waits for work (worker/delivery/broker.py): its peeks wait in Redis on
connections of their own, and its own connection may hold the reply of a claim; a channel that
closes, after the worker cancelled its consumers, must end both without failing and leave no
connection of its own blocked in Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection

from harness.redis_server import RedisServer
from tests.support.waiting import wait_for
from worker.cli.demo.ports import free_port
from worker.delivery.broker import Transport


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", free_port()).start()
    yield server
    server.stop()


def blocked(client: redis.Redis) -> list[str]:
    """The commands of the connections blocked in Redis (a peek is `blmove`)."""
    return [str(c["cmd"]) for c in client.client_list() if "b" in str(c.get("flags", ""))]


def drain(connection: Any) -> None:
    with contextlib.suppress(TimeoutError):
        connection.drain_events(timeout=0.05)


def test_a_channel_closed_after_its_consumer_was_cancelled_while_its_peeks_wait_closes(
    redis_server: RedisServer,
) -> None:
    # Given a channel consuming two empty queues, so that a peek (BLMOVE) waits on each of
    # their lists, each on a connection of its own
    connection: Any = Connection(  # type: ignore[no-untyped-call]
        redis_server.url, transport=Transport, transport_options={"priority_steps": [0]}
    )
    channel = connection.channel()
    for queue in ("idle-a", "idle-b"):
        channel.queue_declare(queue)
        channel.basic_consume(
            queue, no_ack=False, callback=lambda message: None, consumer_tag=queue
        )

    def peeking() -> bool:
        drain(connection)
        return bool(channel.peeks.waiting == {"idle-a", "idle-b"})

    wait_for(peeking, timeout=30, what="a peek to wait on each queue")
    assert blocked(redis_server.client()) == ["blmove", "blmove"]

    # When the consumers are cancelled (a worker's warm shutdown) and the channel closed while
    # the peeks still wait
    channel.basic_cancel("idle-a")
    channel.basic_cancel("idle-b")
    channel.close()

    # Then it closed, and no connection of it waits in Redis any more
    assert channel.closed
    wait_for(lambda: not blocked(redis_server.client()), timeout=10, what="the peeks to end")
    connection.release()


def test_a_channel_closed_with_a_claim_to_read_after_its_consumer_was_cancelled_closes(
    redis_server: RedisServer,
) -> None:
    # Given a channel that has just sent its claim (the first thing a consuming channel does)
    connection: Any = Connection(  # type: ignore[no-untyped-call]
        redis_server.url, transport=Transport
    )
    channel = connection.channel()
    channel.queue_declare("idle")
    channel.basic_consume("idle", no_ack=False, callback=lambda message: None, consumer_tag="c")
    connection.transport.cycle.on_poll_start()
    assert channel._claiming and channel._in_poll

    # When the consumer is cancelled and the channel closed with the claim's reply unread
    channel.basic_cancel("c")
    channel.close()

    # Then it closed (the reply read with no queue left to consume)
    assert channel.closed
    connection.release()


def test_a_closed_channel_still_reaches_redis_with_the_parameters_it_had(
    redis_server: RedisServer,
) -> None:
    # Given a channel that has published (a pool process's producer) and was then closed, as
    # kombu closes the channels of a connection it lost
    connection: Any = Connection(redis_server.url, transport=Transport)  # type: ignore[no-untyped-call]
    used = connection.channel()
    used.client.ping()
    assert used.pool is not None  # the pool a producer publishes through
    never = connection.channel()
    used.close()
    never.close()

    # When they are asked for a connection again (kombu's ensure() reviving a publish)
    # Then the one that had reached Redis reaches it with the same parameters, and the one that
    # never had is a lost connection kombu retries, not an AttributeError that fails the task
    # (before: "'NoneType' object has no attribute 'client'" for both)
    assert used.connection is None
    assert used._connparams()["port"] == redis_server.port
    with pytest.raises(redis.exceptions.ConnectionError):
        never._connparams()
    assert redis.exceptions.ConnectionError in Transport.connection_errors
    connection.release()
