"""Sentinel URLs in settings, the Celery configuration made of them, and the client factory."""

from __future__ import annotations

import os

import pytest
from redis.sentinel import SentinelConnectionPool

from worker.app.application import celery_config
from worker.settings import RedisSettings, Settings, load_settings
from worker.stores.redis_connect import redis_client
from worker.stores.redis_urls import display, parse_sentinel, with_password

SENTINELS = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://s3/2"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("IMGPREP_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_a_sentinel_url_with_its_master_name_is_accepted(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("IMGPREP_REDIS_URL", SENTINELS)
    clean_env.setenv("IMGPREP_REDIS__MASTER_NAME", "imgprep")
    clean_env.setenv("IMGPREP_REDIS__PASSWORD", "s3cret")
    clean_env.setenv("IMGPREP_REDIS__SENTINEL_PASSWORD", "watch")
    settings = load_settings()
    assert settings.sentinel
    # the database on every Sentinel's URL: kombu reads it from the first, Celery too
    assert (
        settings.broker
        == settings.results
        == settings.coordination
        == ("sentinel://10.0.0.1:26379/2;sentinel://10.0.0.2:26380/2;sentinel://s3/2")
    )
    assert parse_sentinel(SENTINELS).sentinels == (
        ("10.0.0.1", 26379),
        ("10.0.0.2", 26380),
        ("s3", 26379),
    )
    assert parse_sentinel(SENTINELS).db == 2
    assert "s3cret" not in repr(settings)


def test_a_sentinel_url_without_a_master_name_stops_with_one_line(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("IMGPREP_BROKER_URL", SENTINELS)
    with pytest.raises(SystemExit) as stop:
        load_settings()
    message = str(stop.value.code)
    assert "\n" not in message
    assert "IMGPREP_BROKER_URL" in message and "IMGPREP_REDIS__MASTER_NAME" in message


@pytest.mark.parametrize(
    "url",
    [
        "sentinel://",  # no host
        "sentinel://h1:26379;redis://h2:6379/0",  # mixed schemes
        "sentinel://h1:26379/0;sentinel://h2:26379/1",  # two databases
        "sentinel://h1:99999",  # port out of range
        "sentinel://h1:26379/zero",
    ],
)
def test_malformed_sentinel_urls_are_refused(clean_env: pytest.MonkeyPatch, url: str) -> None:
    clean_env.setenv("IMGPREP_REDIS_URL", url)
    clean_env.setenv("IMGPREP_REDIS__MASTER_NAME", "imgprep")
    with pytest.raises(SystemExit) as stop:
        load_settings()
    assert str(stop.value.code).startswith("imgprep: invalid setting IMGPREP_REDIS_URL")


def test_celery_gets_the_master_name_and_sentinel_options(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings(
        redis_url=SENTINELS,
        redis={"master_name": "imgprep", "password": "pw", "sentinel_password": "watch"},
    )
    config = celery_config(settings)
    assert config["broker_url"] == (
        "sentinel://:pw@10.0.0.1:26379/2;sentinel://:pw@10.0.0.2:26380/2;sentinel://:pw@s3/2"
    )
    assert config["result_backend"] == config["broker_url"]
    options = config["broker_transport_options"]
    assert options["master_name"] == "imgprep"
    assert options["sentinel_kwargs"]["password"] == "watch"
    assert options["visibility_timeout"] == settings.visibility_timeout  # today's options stay
    assert config["result_backend_transport_options"]["master_name"] == "imgprep"
    assert config["override_backends"]["sentinel"] == "worker.app.results:RedactingSentinelBackend"


def test_plain_urls_keep_todays_configuration(clean_env: pytest.MonkeyPatch) -> None:
    config = celery_config(Settings(redis_url="redis://redis:6379/0"))
    assert config["broker_url"] == config["result_backend"] == "redis://redis:6379/0"
    assert "master_name" not in config["broker_transport_options"]
    assert "result_backend_transport_options" not in config


def test_credentials_in_a_url_win_and_are_hidden_in_display() -> None:
    assert with_password("sentinel://:a@h:1", "b") == "sentinel://:a@h:1"
    assert (
        display("sentinel://:a@h:1;sentinel://:a@g:2") == "sentinel://:***@h:1;sentinel://:***@g:2"
    )


def test_the_factory_makes_a_master_client_with_todays_timeouts() -> None:
    client = redis_client(SENTINELS, RedisSettings(master_name="imgprep", password="pw"))
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.is_master
    assert pool.service_name == "imgprep"
    kwargs = client.get_connection_kwargs()
    assert kwargs["socket_timeout"] == 30.0
    assert kwargs["password"] == "pw" and kwargs["db"] == 2
    with pytest.raises(ValueError, match="IMGPREP_REDIS__MASTER_NAME"):
        redis_client(SENTINELS)
    plain = redis_client("redis://127.0.0.1:1/0", RedisSettings(password="pw"))
    assert plain.get_connection_kwargs()["socket_timeout"] == 30.0
    assert plain.get_connection_kwargs()["password"] == "pw"


def test_kombu_flower_and_beat_read_the_sentinels_from_the_app(
    clean_env: pytest.MonkeyPatch,
) -> None:
    from flower.utils.broker import Broker, RedisSentinel

    from worker.app.application import create_app
    from worker.delivery.broker import SentinelTransport

    settings = Settings(
        redis_url="sentinel://127.0.0.1:1;sentinel://127.0.0.1:2/3",
        redis={"master_name": "imgprep"},
    )
    app = create_app(settings)
    with app.connection_for_write() as connection:
        assert connection.transport_cls == "sentinel"
        assert isinstance(connection.transport, SentinelTransport)
        assert connection.alt == ["sentinel://127.0.0.1:1/3", "sentinel://127.0.0.1:2/3"]
        uri = connection.as_uri(include_password=True)
    # Flower's queue view (what `imgprep flower` shows as broker queues)
    broker = Broker(uri, http_api=None, broker_options=app.conf.broker_transport_options)
    assert isinstance(broker, RedisSentinel)
    assert (broker.master_name, broker.vhost) == ("imgprep", 3)
    # beat publishes with the same app configuration
    assert app.conf.broker_transport_options["master_name"] == "imgprep"
