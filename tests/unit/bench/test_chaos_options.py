"""bench.chaos's options: the failover fault exists only on Sentinel."""

from __future__ import annotations

import pytest

from bench.chaos.__main__ import parse
from bench.chaos.checker import EXPLAINED_BY
from bench.chaos.nemesis import KINDS


def test_the_failover_fault_needs_sentinel() -> None:
    with pytest.raises(SystemExit):
        parse(["--seed", "1", "--duration", "5", "--faults", "failover"])
    options = parse(["--seed", "1", "--duration", "5", "--sentinel", "--faults", "failover"])
    assert options.sentinel and options.nemesis.kinds == ("failover",)


def test_on_sentinel_failover_replaces_redis_restart_by_default() -> None:
    assert parse(["--seed", "1", "--duration", "5"]).nemesis.kinds == KINDS
    kinds = parse(["--seed", "1", "--duration", "5", "--sentinel"]).nemesis.kinds
    assert "failover" in kinds and "redis_restart" not in kinds
    with pytest.raises(SystemExit):
        parse(["--seed", "1", "--duration", "5", "--sentinel", "--faults", "redis_restart"])


def test_a_failover_explains_what_a_redis_restart_does() -> None:
    for error, faults in EXPLAINED_BY.items():
        assert ("redis_restart" in faults) == ("failover" in faults), error


def test_the_ceph_faults_need_rbd_and_come_with_it() -> None:
    with pytest.raises(SystemExit):
        parse(["--seed", "1", "--duration", "5", "--faults", "kill_osd"])
    options = parse(["--seed", "1", "--duration", "5", "--rbd"])
    assert options.rbd and options.workload.rbd
    assert {"kill_osd", "kill_mon"} <= set(options.nemesis.kinds)
    assert set(KINDS) <= set(options.nemesis.kinds)
