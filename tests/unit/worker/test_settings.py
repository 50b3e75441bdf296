"""Settings: defaults in code equal config/imgprep.toml, environment overrides, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from domain.core.models import PrepareRequest
from tests.unit.core.test_wire_input import prepare
from worker import settings as settings_module
from worker.settings import REPO_CONFIG, Settings, describe, load_settings

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("IMGPREP_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_toml_documents_exactly_the_code_defaults(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("IMGPREP_CONFIG", str(tmp_path / "absent.toml"))
    from_code = Settings()
    clean_env.setenv("IMGPREP_CONFIG", str(REPO_CONFIG))
    from_file = Settings()
    assert from_file == from_code
    # and every setting of the model is documented in the file (host_id defaults to the hostname)
    import tomllib

    documented = tomllib.loads(REPO_CONFIG.read_text())
    for name in Settings.model_fields:
        if name in ("host_id", "broker_url", "result_backend"):
            continue
        assert name in documented, f"{name} is missing from config/imgprep.toml"
        group = getattr(from_code, name)
        if isinstance(group, BaseModel):
            assert set(documented[name]) == set(type(group).model_fields), name


def test_the_hosts_file_replaces_the_checkouts_unless_imgprep_config_names_one(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a host file (as scripts/install.sh writes) that turns privilege separation on
    host = tmp_path / "etc-imgprep.toml"
    host.write_text('[privileges]\nhelper_socket = "/run/imgprep/helper.sock"\nuser = "imgprep"\n')
    clean_env.setattr(settings_module, "HOST_CONFIG", host)
    # Then without IMGPREP_CONFIG the host's file is read, the rest keeps its defaults
    settings = Settings()
    assert (settings.privileges.helper_socket, settings.privileges.user) == (
        "/run/imgprep/helper.sock",
        "imgprep",
    )
    assert settings.lock.lease_seconds == 30
    # and IMGPREP_CONFIG still names the one file read
    clean_env.setenv("IMGPREP_CONFIG", str(REPO_CONFIG))
    assert Settings().privileges.helper_socket == ""
    # and without a host file, the checkout's is read
    clean_env.delenv("IMGPREP_CONFIG")
    clean_env.setattr(settings_module, "HOST_CONFIG", tmp_path / "absent.toml")
    assert settings_module.config_file() == REPO_CONFIG


def test_environment_overrides_file_and_nested_groups_merge(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("IMGPREP_CONFIG", str(REPO_CONFIG))
    clean_env.setenv("IMGPREP_LOCK__LEASE_SECONDS", "90")
    clean_env.setenv("IMGPREP_FETCH__ALLOWED_SCHEMES", '["https"]')
    clean_env.setenv("IMGPREP_FETCH__DENIED_NETWORKS", '["169.254.0.0/16", "fd00::/8"]')
    clean_env.setenv("IMGPREP_REDIS_URL", "redis://redis.example:6380/2")
    settings = Settings()
    assert settings.lock.lease_seconds == 90
    assert settings.lock.renew_seconds == 10  # from the file, not lost by the override
    assert settings.fetch.allowed_schemes == ("https",)
    assert [str(n) for n in settings.fetch.denied_networks] == ["169.254.0.0/16", "fd00::/8"]
    assert settings.broker == settings.results == "redis://redis.example:6380/2"


def test_broker_and_results_can_be_split(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("IMGPREP_BROKER_URL", "redis://broker:6379/0")
    settings = Settings()
    assert settings.broker == "redis://broker:6379/0"
    assert settings.results == settings.coordination == "redis://localhost:6379/0"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("IMGPREP_LOCK__LEASE_SECONDS", "soon", "IMGPREP_LOCK__LEASE_SECONDS"),
        ("IMGPREP_CACHE_DIR", "relative/dir", "IMGPREP_CACHE_DIR"),
        ("IMGPREP_REDIS_URL", "http://not-redis", "IMGPREP_REDIS_URL"),
        ("IMGPREP_VISIBILITY_TIMEOUT", "100", "IMGPREP"),  # cross-field rule: names the rule
        ("IMGPREP_FETCH__ALLOWED_SCHEMES", '["ftp"]', "IMGPREP_FETCH__ALLOWED_SCHEMES"),
        ("IMGPREP_FETCH__DENIED_NETWORKS", '["metadata"]', "IMGPREP_FETCH__DENIED_NETWORKS"),
        ("IMGPREP_FETCH__DENIED_NETWORKS", '["10.0.0.1/8"]', "IMGPREP_FETCH__DENIED_NETWORKS"),
        ("IMGPREP_FETCH__MIN_BYTES_PER_SECOND", "-1", "IMGPREP_FETCH__MIN_BYTES_PER_SECOND"),
    ],
)
def test_invalid_setting_is_one_line_naming_it(
    clean_env: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        load_settings()
    message = str(stop.value.code)
    assert "\n" not in message
    assert message.startswith(f"imgprep: invalid setting {expected}")


def test_visibility_timeout_must_exceed_step_time_limit(clean_env: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as error:
        Settings(visibility_timeout=600, step_time_limit=500)  # 500 + 120 s of backoff > 600
    assert "delivered twice" in describe(error.value)
    relaxed = Settings(visibility_timeout=600, step_time_limit=470, lock={"wait_seconds": 300})
    assert relaxed.soft_time_limit == 440
    with pytest.raises(ValidationError, match="wait_seconds"):
        Settings(step_time_limit=600, lock={"wait_seconds": 900})


def test_redis_outage_window_sizes_celery_retries(clean_env: pytest.MonkeyPatch) -> None:
    from worker.app.application import celery_config

    # the window sizes Celery's publish retries (about one a second) and result-write retries
    config = celery_config(Settings(redis_outage_seconds=30))
    policy = config["task_publish_retry_policy"]
    assert policy["max_retries"] == 32 and policy["interval_max"] == 1
    assert config["result_backend_always_retry"] is True
    assert config["result_backend_max_retries"] == 67
    assert config["result_backend_max_sleep_between_retries_ms"] == 1000


def test_cli_stops_on_invalid_setting_with_one_line() -> None:
    env = {**os.environ, "IMGPREP_LOCK__RENEW_SECONDS": "-1"}
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "imgprep: invalid setting IMGPREP_LOCK__RENEW_SECONDS: Input should be greater than 0"
    ]


def test_hosts_beat_before_they_count_as_silent(clean_env: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="twice heartbeat_seconds"):
        Settings(hosts={"heartbeat_seconds": 20, "silent_after_seconds": 30})
    with pytest.raises(ValidationError, match="abandon_after_seconds"):
        Settings(hosts={"silent_after_seconds": 30, "abandon_after_seconds": 10})


def test_a_host_a_request_can_name_is_a_host_id_a_worker_can_have() -> None:
    longest = "h" * 63
    assert (
        Settings(host_id=longest).host_id
        == PrepareRequest.model_validate({**prepare(), "host": longest}).host
    )
    with pytest.raises(ValidationError, match="host"):
        PrepareRequest.model_validate({**prepare(), "host": "h" * 64})
