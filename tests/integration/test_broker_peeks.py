"""The peeks of worker/delivery/broker.py on a real redis-server, through kombu's own consumer API
(the worker's event loop is exercised by test_claim_latency.py): every list of every queue a channel
consumes is watched, and a message on any of them is claimed and recorded; a cancelled queue is
watched no more; a Redis that refuses BLMOVE is consumed the old way; a master turned replica is
a lost connection, not a reason to stop claiming atomically."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message
from kombu.messaging import Consumer, Producer

from harness.redis_server import RedisServer
from tests.support.waiting import wait_for
from worker.cli.demo.ports import free_port
from worker.delivery.broker import OWNER_KEY, Transport, consumer_id

PRIORITY_STEPS = [0, 3, 6, 9]  # kombu's: a queue is four lists


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", free_port(), appendonly=False).start()
    yield server
    server.stop()


class Consuming:
    """A kombu connection over worker.delivery.broker's transport, consuming `queues`; what it
    receives is kept, unacknowledged."""

    def __init__(self, url: str, queues: list[str]) -> None:
        connection: Any = Connection(url, transport=Transport)  # type: ignore[no-untyped-call]
        self.connection = connection
        self.channel = connection.channel()
        self.received: list[Message] = []
        consumer: Any = Consumer(  # type: ignore[no-untyped-call]
            self.channel,
            [Queue(name) for name in queues],  # type: ignore[no-untyped-call]
            callbacks=[lambda body, message: self.received.append(message)],
            accept=["json"],
        )
        consumer.consume()
        self.consumer = consumer

    def drain(self) -> None:
        with contextlib.suppress(TimeoutError):
            self.connection.drain_events(timeout=0.05)

    def until(self, condition: Callable[[], bool], what: str) -> None:
        """Drain events until `condition` holds."""

        def drained() -> bool:
            self.drain()
            return condition()

        wait_for(drained, timeout=30, what=what)

    @property
    def watched(self) -> set[str]:
        return self.channel.peeks.waiting  # type: ignore[no-any-return]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.close()
        self.connection.release()


def publish(url: str, queue: str, body: dict[str, object], priority: int = 0) -> None:
    with Connection(url) as connection:  # type: ignore[no-untyped-call]
        producer: Any = Producer(connection.channel())  # type: ignore[no-untyped-call]
        producer.publish(body, routing_key=queue, serializer="json", priority=priority)


def lists(queue: str) -> set[str]:
    return {queue if step == 0 else f"{queue}\x06\x16{step}" for step in PRIORITY_STEPS}


def blocked(client: redis.Redis) -> list[str]:
    return [str(c["cmd"]) for c in client.client_list() if "b" in str(c.get("flags", ""))]


def test_every_list_of_every_queue_is_watched_and_any_message_is_claimed_and_recorded(
    redis_server: RedisServer,
) -> None:
    # Given a channel consuming three queues: twelve lists with their priorities
    queues = ["alpha", "beta", "gamma"]
    consuming = Consuming(redis_server.url, queues)
    try:
        everything = set().union(*map(lists, queues))
        consuming.until(lambda: consuming.watched == everything, "a peek on each list")
        assert blocked(redis_server.client()).count("blmove") == 12

        # When a message arrives on each queue, one with a priority (another list)
        for number, queue in enumerate(queues):
            publish(redis_server.url, queue, {"n": number}, priority=9 if number == 2 else 0)

            # Then it is received, recorded as unacknowledged and owned by this process
            consuming.until(lambda: len(consuming.received) > number, f"the message on {queue}")  # noqa: B023
            tag = consuming.received[number].delivery_tag
            assert redis_server.client().hget(OWNER_KEY, tag) == consumer_id().encode()
        assert [m.payload for m in consuming.received] == [{"n": 0}, {"n": 1}, {"n": 2}]
    finally:
        consuming.close()


def test_a_cancelled_queue_is_watched_no_more_and_keeps_its_messages(
    redis_server: RedisServer,
) -> None:
    # Given a channel consuming two queues, its peeks waiting
    consuming = Consuming(redis_server.url, ["kept", "dropped"])
    try:
        consuming.until(lambda: len(consuming.watched) == 8, "the peeks")

        # When it stops consuming one of them, and a message arrives on it
        consuming.consumer.cancel_by_queue("dropped")
        consuming.until(
            lambda: consuming.watched == lists("kept"), "the cancelled queue's peeks to end"
        )
        publish(redis_server.url, "dropped", {"n": 1})
        for _ in range(10):
            consuming.drain()

        # Then nothing of it is taken: the message waits in its queue, and only the other
        # queue's lists are watched
        assert consuming.received == []
        assert redis_server.client().llen("dropped") == 1
        assert blocked(redis_server.client()).count("blmove") == 4
    finally:
        consuming.close()


def test_a_redis_that_refuses_blmove_is_consumed_with_kombus_brpop(
    redis_server: RedisServer,
) -> None:
    # Given a Redis user that may not run BLMOVE (as on a Redis older than 6.2, which has none)
    redis_server.client().acl_setuser(
        "nopeek",
        enabled=True,
        nopass=True,
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-blmove"],
    )
    url = f"redis://nopeek@127.0.0.1:{redis_server.port}/0"
    consuming = Consuming(url, ["plain"])
    try:
        # When the channel waits for work, and a message arrives
        consuming.until(lambda: not consuming.channel.takes_atomically, "kombu's way")
        publish(redis_server.url, "plain", {"n": 1})

        # Then it is received all the same, taken with BRPOP, and no peek is left open
        consuming.until(lambda: bool(consuming.received), "the message")
        assert consuming.received[0].payload == {"n": 1}
        assert "blmove" not in blocked(redis_server.client())
    finally:
        consuming.close()


def test_a_master_turned_replica_is_a_lost_connection_not_a_reason_to_stop_claiming(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Given a channel whose peeks wait on a master
    consuming = Consuming(redis_server.url, ["work"])
    other = RedisServer(tmp_path / "other", free_port(), appendonly=False).start()
    try:
        consuming.until(lambda: "blmove" in blocked(redis_server.client()), "a peek to wait")

        # When the master becomes a replica (a failover that keeps the old master), which
        # unblocks every client blocked in it with an UNBLOCKED error
        redis_server.client().replicaof("127.0.0.1", other.port)

        # Then the channel reports a lost connection, for the worker to reconnect (to the new
        # master, through the Sentinels), and still takes messages with the claim script
        with pytest.raises(consuming.connection.connection_errors):
            consuming.until(lambda: False, "a lost connection")
        assert consuming.channel.takes_atomically
    finally:
        redis_server.client().replicaof("no", "one")
        consuming.close()
        other.stop()
