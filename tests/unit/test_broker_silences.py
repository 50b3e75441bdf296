"""How long a consumer has been silent while Redis was up (worker.delivery.liveness.silences): the
outages since its last beat do not count, and the time Redis was up between them does."""

from __future__ import annotations

import pytest

from worker.delivery.liveness import silences


def test_without_an_outage_silence_is_the_time_since_the_last_beat() -> None:
    # Given two consumers that beat 3 s and 40 s ago, and no outage
    beats = {"alive": 997.0, "dead": 960.0}

    # Then each has been silent since its last beat
    assert silences(beats, now=1000.0, outages=[]) == {"alive": 3.0, "dead": 40.0}


def test_an_outage_does_not_count_as_silence() -> None:
    # Given a consumer that beat last at 100, Redis down from 104 (the last beat before) to 115,
    # and a consumer that beat again at 120
    beats = {"quiet": 100.0, "alive": 120.0}

    # When it is 125
    found = silences(beats, now=125.0, outages=[(104.0, 115.0)])

    # Then the quiet one has been silent 4 s before the outage and 10 s after it
    assert found == {"quiet": pytest.approx(14.0), "alive": pytest.approx(5.0)}


def test_a_consumer_dead_through_restarts_every_few_seconds_is_found_dead() -> None:
    # Given a consumer that died at 0, and Redis down 5-10 and 25-30 (a restart every 15 s or
    # so, as under the fault campaign)
    outages = [(5.0, 10.0), (25.0, 30.0)]

    # When it is 42 (Redis up for 12 s since its last start)
    found = silences({"dead": 0.0, "alive": 40.0}, now=42.0, outages=outages)

    # Then the dead one has been silent for the 32 s Redis was up since it died (counting only
    # the time since Redis last started, as a restart every 15 s would have it, it would never
    # be found dead)
    assert found == {"dead": pytest.approx(32.0), "alive": pytest.approx(2.0)}
