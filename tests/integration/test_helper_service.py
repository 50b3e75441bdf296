"""The helper as its own service (deploy/systemd/imgprep-helper.service): run with exactly the
unit's capability bounding set, it serves a worker that runs as imgprep and does not start a
helper, through whole prepares with injection."""

from __future__ import annotations

import configparser
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.privileges import WORKER_USER, HelperProcess, open_directory, unprivileged_user
from helper import capabilities
from tests.integration.conftest import Cluster, ClusterFactory
from tests.integration.devices import MOTD, need_devices
from tests.integration.test_privileges import injecting
from tests.support.guests import MiB, read_guest_file
from tests.support.processes import children
from worker.cli.demo.image_server import ImageServer

pytestmark = pytest.mark.slow

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "imgprep-helper.service"


def unit_bounding_set() -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]["CapabilityBoundingSet"].split()


@pytest.fixture
def open_root() -> Iterator[Path]:
    with open_directory("svc-root") as root:
        yield root


@pytest.fixture
def service_cluster(
    cluster_factory: ClusterFactory,
) -> Iterator[tuple[Cluster, HelperProcess]]:
    """A worker (started as root, dropping to imgprep) whose helper is a separate process run
    under the unit's bounding set, as systemd would run it."""
    need_devices()
    unprivileged_user()
    with open_directory("svc") as sockets:
        socket_path = sockets / "helper.sock"
        cluster_factory.root = sockets  # reachable by the workers' user, separated or not
        cluster = cluster_factory(
            "service",
            {
                "IMGPREP_PRIVILEGES__HELPER_SOCKET": str(socket_path),
                "IMGPREP_PRIVILEGES__START_HELPER": "false",
                "IMGPREP_PRIVILEGES__USER": WORKER_USER,
                "IMGPREP_PRIVILEGES__HELPER_STATE_DIR": str(sockets / "helper-state"),
            },
        )
        keep = ",".join(
            ["-all", *(f"+{cap.removeprefix('CAP_').lower()}" for cap in unit_bounding_set())]
        )
        setpriv = ["setpriv", f"--bounding-set={keep}", "--inh-caps=-all", "--"]
        with HelperProcess.start(
            cluster.root,
            socket_path=socket_path,
            helper_state_dir=cluster.settings.privileges.helper_state_dir,
            prefix=setpriv,
        ) as helper:
            cluster.add_worker("svc")
            yield cluster, helper


@pytest.mark.parametrize("backend", ["raw", "qcow2"])
def test_a_helper_with_the_units_capabilities_serves_whole_prepares(
    service_cluster: tuple[Cluster, HelperProcess], image_server: ImageServer, backend: str
) -> None:
    cluster, helper = service_cluster
    # Given a helper whose bounding set is the unit's: it can hold nothing else
    held = capabilities.describe(capabilities.sets(helper.process.pid)["CapBnd"])
    assert sorted(held) == sorted(unit_bounding_set())
    # and a worker that runs as imgprep and started no helper of its own
    worker = cluster.workers[0]
    assert worker.helper_pids() == []
    assert capabilities.uids(worker.pid) == (pwd.getpwnam(WORKER_USER).pw_uid,) * 4

    # When a disk is prepared with a file to inject
    request = injecting(image_server, backend)
    prepared = cluster.client.wait_prepared(cluster.client.prepare_disk(request), timeout=180)

    # Then the file is in the guest, owned by root, and nothing is left held
    found = read_guest_file(Path(prepared.disk.path), backend, 1 * MiB, MOTD.path)
    assert found is not None and (found.content, found.uid) == (MOTD.data(), 0)
    assert '"event": "operation_run"' in helper.log_path.read_text()
    assert '"ok": false' not in helper.log_path.read_text()
    cluster.assert_clean()


def test_a_helper_short_of_a_capability_refuses_to_start(tmp_path: Path) -> None:
    # Given the unit's bounding set without CAP_SETPCAP (each operation could not drop the rest)
    short = [cap for cap in unit_bounding_set() if cap != "CAP_SETPCAP"]
    keep = ",".join(["-all", *(f"+{cap.removeprefix('CAP_').lower()}" for cap in short)])
    socket_path = tmp_path / "helper.sock"
    argv = ["setpriv", f"--bounding-set={keep}", "--inh-caps=-all", "--", sys.executable]
    argv += ["-m", "helper", "--socket", str(socket_path), "--user", WORKER_USER]
    for option in ("cache-dir", "instances-dir", "state-dir", "helper-state-dir"):
        (tmp_path / option).mkdir()
        argv += [f"--{option}", str(tmp_path / option)]

    # When the helper starts
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    # Then it stops at once, naming what it lacks and where to give it, and serves nothing
    assert done.returncode == 1
    assert "imgprep-helper lacks CAP_SETPCAP" in done.stderr
    assert "CapabilityBoundingSet" in done.stderr
    assert not socket_path.exists()


def test_a_helper_started_with_every_capability_keeps_only_the_units(open_root: Path) -> None:
    # Given a helper started by a root process that holds every capability (as a worker does)
    unprivileged_user()
    with HelperProcess.start(open_root) as helper:
        # Then the helper (server and zygote alike) keeps only the unit's set, bounding included
        for pid in [helper.process.pid, *children(helper.process.pid)]:
            sets = capabilities.sets(pid)
            assert sorted(capabilities.describe(sets["CapBnd"])) == sorted(unit_bounding_set())
            assert sets["CapEff"] == sets["CapPrm"] == sets["CapBnd"], pid


def test_a_worker_whose_helper_serves_other_directories_stops_at_start(
    cluster_factory: ClusterFactory,
) -> None:
    # Given a helper service for one set of directories, and a worker configured with another
    # helper state directory (so another devices tree) on the same socket
    unprivileged_user()
    with open_directory("svc-mismatch") as root:
        socket_path = root / "helper.sock"
        cluster_factory.root = root
        cluster = cluster_factory(
            "mismatch",
            {
                "IMGPREP_PRIVILEGES__HELPER_SOCKET": str(socket_path),
                "IMGPREP_PRIVILEGES__START_HELPER": "false",
                "IMGPREP_PRIVILEGES__USER": WORKER_USER,
                "IMGPREP_PRIVILEGES__HELPER_STATE_DIR": str(root / "worker-helper-state"),
            },
        )
        with HelperProcess.start(
            cluster.root, socket_path=socket_path, helper_state_dir=root / "service-state"
        ):
            # When the worker starts
            done = cluster.cli("worker", "--hostname", "mismatch@test", timeout=120)
    # Then it stops at once with a failure naming both devices directories
    assert done.returncode == 1
    assert "serves other directories than this worker" in done.stderr
    assert f"the helper's {root / 'service-state' / 'devices'}" in done.stderr
    assert f"this worker's {root / 'worker-helper-state' / 'devices'}" in done.stderr
