"""docker-compose.yml is read, not run (no Docker engine here): check it against the code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from worker.cli import main
from worker.settings import ENV_PREFIX, NESTED_DELIMITER, Settings
from worker.stores.redis_urls import parse_sentinel

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
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


def test_services_and_their_roles(compose: dict[str, Any]) -> None:
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


def test_every_imgprep_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for variable in service.get("environment") or {}:
            if variable.startswith(ENV_PREFIX):
                assert known_setting(variable), f"{name}: {variable} is not an imgprep setting"


def test_worker_command_is_an_imgprep_command(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["imgprep"]' in dockerfile
    assert worker["command"][0] in main.commands


def test_settings_use_the_service_names(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in IMGPREP_SERVICES:
        url = services[name]["environment"]["IMGPREP_REDIS_URL"]
        assert url.startswith("redis://redis:6379")
    volumes = compose["volumes"]
    for mount in services["worker"]["volumes"]:
        source = mount.split(":")[0]
        assert source.startswith("/") or source in volumes, f"undeclared volume {source}"


IMGPREP_SERVICES = ("worker", "beat", "flower")


def service_env(service: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(service.get("environment") or {}).items()}


def test_imgprep_services_run_imgprep_commands_that_exist(compose: dict[str, Any]) -> None:
    from click.testing import CliRunner

    services = compose["services"]
    assert set(IMGPREP_SERVICES) <= set(services)
    for name in IMGPREP_SERVICES:
        service = services[name]
        # the image's entrypoint is `imgprep`: no service replaces it
        assert service["build"] == "." and "entrypoint" not in service, name
        command = service["command"]
        assert command[0] in main.commands, f"{name}: imgprep has no command {command[0]}"
        assert CliRunner().invoke(main, [command[0], "--help"]).exit_code == 0
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_each_services_environment_loads_as_valid_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in IMGPREP_SERVICES:
        env = service_env(compose["services"][name])
        for variable in list(os.environ):
            if variable.startswith(ENV_PREFIX):
                monkeypatch.delenv(variable)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        settings = Settings()
        assert urlsplit(settings.redis_url).hostname == "redis", name


def test_worker_has_its_host_queue_shared_cache_and_metrics_port(
    compose: dict[str, Any],
) -> None:
    worker = compose["services"]["worker"]
    env = service_env(worker)
    # a host id, and no --queues override: it consumes imgprep and imgprep.host.<id>
    assert env["IMGPREP_HOST_ID"]
    assert "-Q" not in worker["command"] and "--queues" not in worker["command"]
    # the cache directory is a named volume (shared with other hosts through its driver)
    targets = {m.split(":")[1]: m.split(":")[0] for m in worker["volumes"]}
    assert targets[env["IMGPREP_CACHE_DIR"]] in compose["volumes"]
    assert targets[env["IMGPREP_INSTANCES_DIR"]] in compose["volumes"]
    assert targets[env["IMGPREP_STATE_DIR"]] in compose["volumes"]
    assert f"{env['IMGPREP_METRICS__PORT']}:{env['IMGPREP_METRICS__PORT']}" in worker["ports"]


def test_flower_api_is_reachable_and_beat_keeps_its_schedule(compose: dict[str, Any]) -> None:
    services = compose["services"]
    flower_env = service_env(services["flower"])
    assert flower_env.get("FLOWER_UNAUTHENTICATED_API") == "true" or "FLOWER_BASIC_AUTH" in (
        flower_env
    )
    assert "5555:5555" in services["flower"]["ports"]
    beat_targets = [m.split(":")[1] for m in services["beat"]["volumes"]]
    assert service_env(services["beat"])["IMGPREP_STATE_DIR"] in beat_targets


HA_SERVICES = ("worker-ha", "beat-ha", "flower-ha")


def test_profile_ha_runs_redis_with_a_replica_three_sentinels_and_imgprep_on_them(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    sentinels = [name for name in services if name.startswith("sentinel-")]
    assert len(sentinels) == 3
    master, replica = services["redis-ha-1"], services["redis-ha-2"]
    assert "--replicaof" not in master["command"]
    assert replica["command"][replica["command"].index("--replicaof") + 1 :] == [
        "redis-ha-1",
        "6379",
    ]
    for name in ("redis-ha-1", "redis-ha-2", *sentinels, *HA_SERVICES):
        assert services[name]["profiles"] == ["ha"], name
    for name in ("redis", *IMGPREP_SERVICES):  # today's stack stays the default
        assert "profiles" not in services[name], name
    for name in sentinels:
        script = services[name]["command"][-1]
        assert "sentinel monitor imgprep redis-ha-1 6379 2" in script  # a quorum of 2 of 3
        assert services[name]["environment"]["SENTINEL_HOST"] == name
    for name in HA_SERVICES:
        for variable in list(os.environ):
            if variable.startswith(ENV_PREFIX):
                monkeypatch.delenv(variable)
        for variable, value in service_env(services[name]).items():
            monkeypatch.setenv(variable, value)
        settings = Settings()
        assert settings.sentinel and settings.redis.master_name == "imgprep", name
        named = {host for host, _ in parse_sentinel(settings.coordination).sentinels}
        assert named == set(sentinels), name
        assert set(services[name]["depends_on"]) == set(sentinels), name
        assert services[name]["command"][0] in main.commands, name


def test_second_host_has_its_own_cache_and_takes_images_from_the_first(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    first, second = services["worker"], services["worker-2"]
    assert second["command"] == first["command"] and second["privileged"] is True
    loaded = []
    for service in (first, second):
        for variable in list(os.environ):
            if variable.startswith(ENV_PREFIX):
                monkeypatch.delenv(variable)
        for variable, value in service_env(service).items():
            monkeypatch.setenv(variable, value)
        loaded.append(Settings())
    one, two = loaded
    # two hosts, each in host scope with its own cache volume
    assert one.host_id != two.host_id
    assert one.image_cache.scope == two.image_cache.scope == "host"

    def volume(service: dict[str, Any], target: Path) -> str:
        mounts = [str(m) for m in service["volumes"]]
        return next(m.split(":")[0] for m in mounts if m.split(":")[1] == str(target))

    for directory in ("cache_dir", "instances_dir", "state_dir"):
        a, b = volume(first, getattr(one, directory)), volume(second, getattr(two, directory))
        assert a != b and a in compose["volumes"] and b in compose["volumes"], directory
    # each reaches the other's peer server by its service name, with the same secret
    assert one.peer.secret == two.peer.secret != ""
    assert one.peer_url == f"http://worker:{one.peer.port}"
    assert two.peer_url == f"http://worker-2:{two.peer.port}"
    assert set(first["ports"]).isdisjoint(second["ports"])


def test_profile_rbd_points_a_worker_at_an_existing_cluster(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = compose["services"]["worker-rbd"]
    assert worker["profiles"] == ["rbd"]
    env = service_env(worker)
    for variable in list(os.environ):
        if variable.startswith(ENV_PREFIX):
            monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    settings = Settings()
    # the cluster's client files come read-only from the host's /etc/ceph
    assert "/etc/ceph:/etc/ceph:ro" in worker["volumes"]
    assert settings.rbd.conf.parent.as_posix() == "/etc/ceph"
    assert settings.rbd.keyring.startswith("/etc/ceph/") and settings.rbd.user
    assert settings.rbd.pool != settings.rbd.images_pool
    # a host of its own, with /dev/fuse for injection through qemu-storage-daemon's rbd driver
    others = {
        service_env(compose["services"][name])["IMGPREP_HOST_ID"] for name in ("worker", "worker-2")
    }
    assert settings.host_id not in others
    assert any(str(device).startswith("/dev/fuse") for device in worker["devices"])
