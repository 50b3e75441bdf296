"""How scripts/test.sh runs the suite in parallel processes (pytest-xdist): which tests one
process must run together, which go first, and which run alone (CONTRIBUTING.md).

Each test process has its own session fixtures (a redis-server and two workers, an image server,
a Ceph cluster when one of its tests needs it), in directories and on ports of its own. Tests are
handed out one at a time in the order collected, except those of a group, which one process runs:
the rbd tests share a session Ceph cluster (two in all, not one per process), and modules with
module-scoped fixtures keep them once.

Groups are read from GROUPS by `GroupScheduling`, the scheduler of `--dist loadgroup` here
(tests/conftest.py): pytest-xdist 3.8 groups tests by renaming them after their `xdist_group`
mark, which pytest 9.2's structured node ids ignore (pytest-dev/pytest-xdist#1386), so marks
alone group nothing. Its own marks still count when xdist honours them again.
"""

from __future__ import annotations

from xdist.scheduler import LoadGroupScheduling

# module → group: the modules of one group run in one process, one after the other
GROUPS = {
    "test_rbd.py": "ceph",
    "test_rbd_faults.py": "ceph-faults",  # a second Ceph: the rbd tests are minutes in one
    "test_rbd_injection.py": "ceph-faults",
    "test_cache_manager.py": "cache_manager",  # module-scoped fixtures
    "test_flower.py": "flower",
    "test_metrics.py": "metrics",
    "test_guest_boots.py": "boots",  # when they run in parallel (`pytest -n` without -m)
}

# The longest first, so that no process starts a long test when the others are done: the groups,
# then the modules whose tests take half a minute or more under a parallel run's load. Every test
# still runs alone, and in any order (plain `pytest` runs them in this order too).
LONGEST_FIRST = (
    "test_chaos_campaign.py",
    "test_guest_boots.py",
    "test_rbd.py",
    "test_rbd_faults.py",
    "test_rbd_injection.py",
    "test_cache_manager.py",
    "test_fleet_trust.py",
    "test_fleet.py",
    "test_hostile_images.py",
    "test_device_lifecycle.py",
    "test_sentinel.py",
    "test_privileges.py",
    "test_redis_outage.py",
    "test_broker_delivery.py",
    "test_helper_service.py",
    "test_reliability.py",
    "test_hosts.py",
    "test_guest_image.py",
    "test_cache_integrity.py",
    "test_flower.py",
    "test_privilege_races.py",
    "test_chaos.py",
    "test_metrics.py",
)

# Tests that may not run beside others: after the parallel phase, one at a time (marker
# `serial`). Beside a parallel run's load on 2 cores, the campaign completed too few operations
# in its 75 s to mean anything (45 of the 50 it requires), and a guest's kernel found its timer
# unreliable and panicked ("IO-APIC + timer doesn't work").
SERIAL = frozenset({"test_chaos_campaign.py", "test_guest_boots.py"})


def module_of(nodeid: str) -> str:
    """The file name of a test's module: `tests/integration/test_rbd.py::test_x` → test_rbd.py."""
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


class GroupScheduling(LoadGroupScheduling):  # type: ignore[misc]
    """xdist's loadgroup, with the groups of GROUPS."""

    def _split_scope(self, nodeid: str) -> str:
        group = GROUPS.get(module_of(nodeid))
        return group if group is not None else str(super()._split_scope(nodeid))
