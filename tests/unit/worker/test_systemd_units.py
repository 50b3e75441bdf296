"""deploy/systemd is read and verified by systemd's own checker (no systemd runs here): the
helper holds only what its operations need, everything else runs as imgprep without any."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from helper import capabilities
from helper.operations import CAPABILITIES
from worker.settings import ENV_PREFIX

REPO = Path(__file__).resolve().parents[3]
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
# Options that give a service a mount namespace of its own: the helper's mounts would not be
# the host's, and the workers would never see them
OWN_MOUNT_NAMESPACE = (
    "PrivateTmp",
    "ProtectSystem",
    "ProtectHome",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "PrivateDevices",
    "PrivateMounts",
    "TemporaryFileSystem",
    "BindPaths",
    "RootDirectory",
)


def rendered(tmp: Path) -> dict[str, Path]:
    """The units as scripts/install.sh writes them (@CHECKOUT@ is this checkout)."""
    out = {}
    for unit in UNITS:
        target = tmp / unit.name
        target.write_text(unit.read_text().replace("@CHECKOUT@", str(REPO)))
        out[unit.stem] = target
    return out


def service(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser["Service"]


def test_the_units_pass_systemds_checker(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    units = rendered(tmp_path)
    assert set(units) == {"imgprep-helper", "imgprep-worker", "imgprep-beat", "imgprep-flower"}
    done = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units.values())],
        capture_output=True,
        text=True,
        check=False,
    )
    complaints = [
        line for line in done.stderr.splitlines() if str(tmp_path) in line or "imgprep" in line
    ]
    assert done.returncode == 0 and not complaints, done.stderr


def test_the_helper_holds_only_what_its_operations_need(tmp_path: Path) -> None:
    helper = service(rendered(tmp_path)["imgprep-helper"])
    assert helper["User"] == "root"
    assert helper["ExecStart"] == f"{REPO}/.venv/bin/imgprep helper"
    held = set(helper["CapabilityBoundingSet"].split())
    needed = {capabilities.NAMES[cap] for caps in CAPABILITIES.values() for cap in caps}
    # its operations' capabilities, CAP_SETPCAP to drop the rest from each operation's bounding
    # set, CAP_CHOWN for its socket: no more
    assert held == needed | {"CAP_SETPCAP", "CAP_CHOWN"}
    assert not [option for option in OWN_MOUNT_NAMESPACE if option in helper]
    assert helper["KillMode"] == "process"  # a restart keeps the FUSE daemons of disks in use


@pytest.mark.parametrize("name", ["imgprep-worker", "imgprep-beat", "imgprep-flower"])
def test_everything_else_runs_as_imgprep_without_capabilities(tmp_path: Path, name: str) -> None:
    unit = service(rendered(tmp_path)[name])
    assert unit["User"] == unit["Group"] == "imgprep"
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["CapabilityBoundingSet"] == "" and unit["AmbientCapabilities"] == ""
    assert unit["ExecStart"].startswith(f"{REPO}/.venv/bin/imgprep {name.split('-')[1]}")


def test_the_worker_uses_the_helper_service(tmp_path: Path) -> None:
    units = rendered(tmp_path)
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(units["imgprep-worker"].read_text())
    assert "imgprep-helper.service" in parser["Unit"]["requires"].split()
    assert "imgprep-helper.service" in parser["Unit"]["after"].split()
    assert f"{ENV_PREFIX}PRIVILEGES__START_HELPER=false" in parser["Service"]["environment"]
    assert service(units["imgprep-worker"])["KillMode"] == "mixed"  # Celery's warm shutdown


def test_install_writes_every_unit() -> None:
    script = (REPO / "scripts" / "install.sh").read_text()
    assert "deploy/systemd/*.service" in script and "/etc/systemd/system" in script
