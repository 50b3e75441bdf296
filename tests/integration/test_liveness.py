"""The one liveness mechanism (worker/delivery/liveness.py) against a real redis-server: beats in
Redis's clock, silences that leave Redis's outages out, the keys kept `keep_seconds`, and the
hosts' heartbeats measured the same way as the broker's consumers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.redis_server import RedisServer
from worker.cli.demo.ports import free_port
from worker.delivery.broker import CONSUMERS, CONSUMERS_KEY
from worker.delivery.hosts import HOSTS_KEY, HostRegistry
from worker.delivery.liveness import Liveness
from worker.settings import HostSettings

GROUP = Liveness("test:beats", "test:clock", "test:outages")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", free_port()).start()
    yield server
    server.stop()


def test_a_member_that_beats_again_is_less_silent_than_one_that_does_not(
    redis_server: RedisServer,
) -> None:
    # Given two members that beat, and one that beats again a while later
    client = redis_server.client()
    GROUP.beat(client, "quiet")
    GROUP.beat(client, "alive")
    time.sleep(1.5)  # silence is time passing with Redis up: nothing to wait on
    GROUP.beat(client, "alive")

    # When their silences are read
    found = GROUP.silences(client)

    # Then the quiet one has been silent since its beat, the other since its second beat
    assert set(found) == {"quiet", "alive"}
    assert found["quiet"] >= 1.0
    assert found["alive"] < found["quiet"]


def test_the_time_redis_was_down_does_not_count_as_silence(redis_server: RedisServer) -> None:
    # Given a member that beat and then died, with Redis up for a while after its beat, and a
    # live member that beat just before Redis went down (the outage starts at the last beat)
    client = redis_server.client()
    GROUP.beat(client, "dead")
    beat_at = time.monotonic()
    time.sleep(2.0)  # silence is time passing with Redis up: nothing to wait on
    GROUP.beat(client, "alive")

    # When Redis is down for a few seconds, comes back with its data, and a live member beats
    redis_server.stop()
    time.sleep(4.0)
    redis_server.start()
    client = redis_server.client()
    GROUP.beat(client, "alive")
    found = GROUP.silences(client)
    elapsed = time.monotonic() - beat_at

    # Then the outage is recorded and left out of the dead member's silence, and the time Redis
    # was up before the outage still counts (measuring from Redis's start alone would not)
    assert client.llen("test:outages") == 1
    assert found["dead"] <= elapsed - 3.0
    assert found["dead"] >= 1.5


def test_keys_outlive_the_last_beat_by_keep_seconds_only(redis_server: RedisServer) -> None:
    client = redis_server.client()
    # Given a group kept 60 s and the consumers' group, kept for ever
    kept = Liveness("kept:beats", "kept:clock", "kept:outages", keep_seconds=60)

    # When each beats
    kept.beat(client, "member")
    CONSUMERS.beat(client, "consumer")

    # Then the kept group's keys expire within 60 s, the consumers' never
    assert 0 < client.ttl("kept:beats") <= 60
    assert 0 < client.ttl("kept:clock") <= 60
    assert client.ttl(CONSUMERS_KEY) == -1


def test_a_host_silent_before_a_restart_counts_that_silence_as_a_consumer_would(
    redis_server: RedisServer,
) -> None:
    # Given two hosts announced, one of which goes silent with Redis up for 2 s while the other
    # announces itself again just before Redis restarts
    client = redis_server.client()
    registry = HostRegistry(client, HostSettings(), keep_seconds=3600)
    registry.beat("host-dead")
    time.sleep(2.0)  # silence is time passing with Redis up: nothing to wait on
    registry.beat("host-alive")

    # When Redis restarts and the other host announces itself again
    redis_server.restart()
    client = redis_server.client()
    registry = HostRegistry(client, HostSettings(), keep_seconds=3600)
    registry.beat("host-alive")

    # Then the silent host's silence is the time Redis was up since its heartbeat, not only the
    # time since Redis started (what the hosts measured before they shared the consumers' clock)
    assert registry.silence("host-dead").seconds >= 1.5
    assert registry.silence("host-alive").seconds < registry.silence("host-dead").seconds
    assert registry.silence("host-never").never
    assert client.zscore(HOSTS_KEY, "host-alive") is not None
