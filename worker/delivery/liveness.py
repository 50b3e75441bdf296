"""Who is alive: members (consumer processes, hosts) that beat in Redis, and for how long each
has been silent while Redis was up. The one mechanism behind the broker's consumers
(worker.delivery.broker: whose unacknowledged messages to put back) and the hosts
(worker.delivery.hosts: which hosts take requests, whose queues to abandon).

A beat is a Lua script (beat.lua) that records the member's time in Redis's own clock, never a
worker's, in a sorted set. Nobody can beat while Redis is down, so an outage must not count as
silence: the first beat after Redis started again (a new run id) records the outage, from the
last beat before it to Redis's start, and `silences` leaves every outage since a member's last
beat out. Counting only the time since Redis last started instead would never find a member
dead under restarts every few seconds (tests/unit/test_broker_silences.py). The same clock
serves members that beat every 2 s (consumers) or every 10 s (hosts); each group has its own
three keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.stores.lua import script
from worker.stores.replies import text

BEAT = script("worker.delivery", "beat.lua")


@dataclass(frozen=True)
class Liveness:
    """The beats of one group of members, in three keys of Redis."""

    beats_key: str  # sorted set: member → the time of its last beat
    clock_key: str  # hash: Redis's run id at the last beat, and that beat's time
    outages_key: str  # list: "<last beat before> <Redis's start>" of recent restarts
    keep_seconds: int = 0  # how long the keys outlive the last beat (0: for ever)

    def beat(self, client: redis.Redis, member: str) -> None:
        """Announce `member` as alive now."""
        info = client.info("server")
        client.eval(
            BEAT,
            3,
            self.beats_key,
            self.clock_key,
            self.outages_key,
            member,
            info["run_id"],
            info["uptime_in_seconds"],
            self.keep_seconds,
        )

    def queue_reads(self, pipe: Any) -> None:
        """Queue on `pipe` the three replies `silences_from` reads: beats, outages, Redis's time."""
        pipe.zrange(self.beats_key, 0, -1, withscores=True)
        pipe.lrange(self.outages_key, 0, -1)
        pipe.time()

    def silences_from(self, replies: Sequence[Any]) -> dict[str, float]:
        """Each member's silence, from the replies `queue_reads` queued."""
        beats, outages, (seconds, micros) = replies
        return silences(
            {text(member): float(at) for member, at in beats},
            seconds + micros / 1e6,
            [tuple(float(x) for x in text(outage).split()) for outage in outages],
        )

    def silences(self, client: redis.Redis) -> dict[str, float]:
        """Every member that beat (and is kept), with its silence, in one round trip."""
        pipe = client.pipeline(transaction=False)
        self.queue_reads(pipe)
        return self.silences_from(pipe.execute())

    def forget(self, client: redis.Redis, *members: str) -> None:
        if members:
            client.zrem(self.beats_key, *members)


def silences(
    beats: dict[str, float], now: float, outages: Sequence[tuple[float, ...]]
) -> dict[str, float]:
    """Seconds each member has been silent while Redis was up: nobody can beat while Redis is
    down, so the outages (from the last beat before each to Redis's start again) since a
    member's last beat do not count."""
    return {
        member: max(
            0.0,
            now - at - sum(max(0.0, min(end, now) - max(start, at)) for start, end in outages),
        )
        for member, at in beats.items()
    }
