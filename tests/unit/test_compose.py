"""docker-compose.yml is read, not run (no Docker engine here): check it against the code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from worker.cli import main
from worker.settings import ENV_PREFIX, NESTED_DELIMITER, Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, object]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def known_setting(name: str) -> bool:
    parts = name.removeprefix(ENV_PREFIX).lower().split(NESTED_DELIMITER.lower())
    fields = Settings.model_fields
    if parts[0] not in fields:
        return False
    if len(parts) == 1:
        return True
    group = fields[parts[0]].annotation
    return len(parts) == 2 and parts[1] in getattr(group, "model_fields", {})


def test_services_and_their_roles(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict)
    assert {"redis", "worker", "flower"} <= set(services)
    # Redis keeps queued and unacknowledged messages across restarts
    assert "--appendonly" in services["redis"]["command"]
    assert (
        services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1]
        == "yes"
    )
    worker = services["worker"]
    assert worker["privileged"] is True
    assert any(str(d).startswith("/dev/fuse") for d in worker["devices"])
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_imgprep_variable_is_a_real_setting(compose: dict[str, object]) -> None:
    for name, service in compose["services"].items():  # type: ignore[union-attr]
        for variable in service.get("environment") or {}:
            if variable.startswith(ENV_PREFIX):
                assert known_setting(variable), f"{name}: {variable} is not an imgprep setting"


def test_worker_command_is_an_imgprep_command(compose: dict[str, object]) -> None:
    worker = compose["services"]["worker"]  # type: ignore[index]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["imgprep"]' in dockerfile
    assert worker["command"][0] in main.commands


def test_settings_use_the_service_names(compose: dict[str, object]) -> None:
    services = compose["services"]  # type: ignore[index]
    for name in ("worker", "flower"):
        url = services[name]["environment"]["IMGPREP_REDIS_URL"]
        assert url.startswith("redis://redis:6379")
    volumes = compose["volumes"]
    for mount in services["worker"]["volumes"]:
        source = mount.split(":")[0]
        assert source.startswith("/") or source in volumes, f"undeclared volume {source}"
