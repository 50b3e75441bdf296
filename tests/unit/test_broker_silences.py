"""How long a consumer has been silent while Redis was up (worker.broker.silences): the time
Redis was down does not count, and the time it was up before its last restart does."""

from __future__ import annotations

import pytest

from worker.broker import silences


def test_without_a_restart_silence_is_the_time_since_the_last_beat() -> None:
    # Given Redis up for an hour, and two consumers that beat 3 s and 40 s ago
    beats = {"alive": 997.0, "dead": 960.0}

    # Then each has been silent since its last beat
    assert silences(beats, now=1000.0, redis_up=3600.0) == {"alive": 3.0, "dead": 40.0}


def test_an_outage_does_not_count_as_silence() -> None:
    # Given consumers that beat last at 100 and at 104 (when Redis went down), Redis back at
    # 115, and a third consumer beating again at 120
    beats = {"quiet": 100.0, "died-at-outage": 104.0, "alive": 120.0}

    # When it is 125 (Redis up for 10 s)
    found = silences(beats, now=125.0, redis_up=10.0)

    # Then the quiet one has been silent 4 s before the outage and 10 s after it
    assert found["quiet"] == pytest.approx(14.0)
    assert found["alive"] == pytest.approx(5.0)
    assert found["died-at-outage"] == pytest.approx(10.0)


def test_a_consumer_dead_before_restarts_that_come_every_few_seconds_is_found_dead() -> None:
    # Given a consumer that died at 0, while the others beat until each outage: Redis down
    # 5-10 and 25-30 (a restart every 15 s or so, as under the fault campaign)
    beats = {"dead": 0.0, "alive": 40.0, "gone-at-25": 24.5}

    # When it is 42 (Redis up for 12 s since its last restart)
    found = silences(beats, now=42.0, redis_up=12.0)

    # Then the dead one has been silent for more than 20 s of Redis's uptime: its silence counts
    # the time Redis was up before the last restart (counting only since the restart, as a
    # restart every 15 s would have it, it would never be found dead)
    assert found["dead"] > 20.0
    assert found["alive"] == pytest.approx(2.0)


def test_when_nobody_beat_before_a_restart_only_the_uptime_counts() -> None:
    # Given only consumers that beat after Redis started, and one that never beat since
    beats = {"new": 95.0}

    # Then silence is measured from the beat
    assert silences(beats, now=100.0, redis_up=30.0) == {"new": 5.0}
