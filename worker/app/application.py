"""The Celery application: JSON only, late acks, events on, Redis visibility timeout from settings.

`app` is configured lazily from `get_settings()` the first time its configuration is read, so
importing this module reads no settings; `create_app(settings)` makes an app for other settings
(tests, a client of another cluster).
"""

from __future__ import annotations

import functools
import importlib
import math
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import structlog
from celery import Celery

from worker.app.pool import POOL
from worker.app.results import BACKEND as RESULT_BACKEND
from worker.app.results import SENTINEL_BACKEND as RESULT_SENTINEL_BACKEND
from worker.app.routing import DEFAULT_QUEUE
from worker.app.schedule import beat_schedule
from worker.app.signals import connect_signals
from worker.delivery.broker import RestoreStranded, use_for_redis_urls
from worker.delivery.hosts import Heartbeat
from worker.fleet.peer_server import PeerServerStep
from worker.settings import Settings, get_settings
from worker.stores.redis_connect import sentinel_options
from worker.stores.redis_urls import is_sentinel, with_password

log = structlog.get_logger(__name__)

TASK_PACKAGES = ("tasks.steps", "tasks.operations")


def task_modules() -> list[str]:
    """Every module that defines tasks: each step and each operation has its own module."""
    modules = ["tasks.ping"]
    for package_name in TASK_PACKAGES:
        package = importlib.import_module(package_name)
        modules += [
            f"{package_name}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
        ]
    return modules


# Connecting to Redis takes milliseconds; a connect that takes longer is to a host that is gone,
# and every attempt to reach it during an outage must be short for the outage window to hold.
CONNECT_TIMEOUT_SECONDS = 5.0


def publish_retry_policy(outage_seconds: float) -> dict[str, float]:
    """kombu's retry policy for every message we publish: reconnect and retry after 0, 0.5,
    then every 1 s, for about `outage_seconds` (Celery's default gives up within a second)."""
    return {
        "max_retries": math.ceil(outage_seconds) + 2,
        "interval_start": 0,
        "interval_step": 0.5,
        "interval_max": 1,
    }


def result_write_retries(outage_seconds: float) -> dict[str, int]:
    """Result backend retries (`result_backend_always_retry`) that last about `outage_seconds`:
    Celery sleeps a random time up to min(max, base * 2**n) ms between tries, 0.5 s on average
    once the 1 s cap is reached (after 7 tries, 0.6 s)."""
    return {
        "result_backend_max_retries": 7 + 2 * math.ceil(outage_seconds),
        "result_backend_base_sleep_between_retries_ms": 10,
        "result_backend_max_sleep_between_retries_ms": 1000,
    }


def redis_urls(settings: Settings) -> dict[str, Any]:
    """The broker's and the result backend's URLs, with the Redis password of the settings when
    they carry none, and for Sentinel URLs the master's name and how to reach the Sentinels
    (kombu's and Celery's `master_name` and `sentinel_kwargs` transport options)."""
    password = settings.redis.password.get_secret_value() or None
    config: dict[str, Any] = {
        "broker_url": with_password(settings.broker, password),
        "result_backend": with_password(settings.results, password),
    }
    sentinels = {
        "master_name": settings.redis.master_name,
        "sentinel_kwargs": sentinel_options(settings.redis),
    }
    if is_sentinel(settings.results):
        config["result_backend_transport_options"] = sentinels
    return config | ({"sentinel": sentinels} if is_sentinel(settings.broker) else {})


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from imgprep settings."""
    urls = redis_urls(settings)
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # How often a worker looks for messages whose worker died (unacknowledged for longer
        # than the visibility timeout) and puts them back: a twentieth of the timeout.
        "unacked_restore_interval": min(60, max(1, settings.visibility_timeout // 20)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        # Sentinel URLs (sentinel://h1:26379;...): the master's name, the Sentinels' options
        **urls.pop("sentinel", {}),
    }
    return {
        **urls,
        # Results are stored without credentials: arguments and error texts with every URL
        # redacted (worker.app.results); a client reads the same records as from Celery's backend.
        "override_backends": {
            "redis": RESULT_BACKEND,
            "rediss": RESULT_BACKEND,
            "sentinel": RESULT_SENTINEL_BACKEND,
        },
        # JSON only: a pickle payload from the broker would be code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A step acknowledges only when done; a killed pool process sends it back at once.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Celery's prefork pool, whose start survives a pool process killed meanwhile
        "worker_pool": POOL,
        # On a lost broker connection, running steps carry on: with the Redis transport their
        # acknowledgement still lands after reconnecting (unacked messages are kept in Redis by
        # delivery tag), and a message restored meanwhile only runs an idempotent step twice.
        # Cancelling them instead would leave their messages waiting a whole visibility timeout.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Steps end before the Redis transport would deliver their message again.
        "task_time_limit": settings.step_time_limit,
        "task_soft_time_limit": settings.soft_time_limit,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # A Redis restart or failover is ridden out for `redis_outage_seconds`: every publish
        # (a retry, the next step, a canvas) and every result write waits that long for Redis.
        # A step whose message still cannot be published puts it back (StepTask, hand_over).
        "task_publish_retry": True,
        "task_publish_retry_policy": publish_retry_policy(settings.redis_outage_seconds),
        "result_backend_always_retry": True,
        **result_write_retries(settings.redis_outage_seconds),
        "redis_socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        # Flower and `imgprep status` see every step, its arguments and its worker.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # STARTED comes from the journal and task events: not one more result write per step
        "task_track_started": False,
        "result_extended": True,
        "result_expires": settings.result_expires,
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "beat_schedule": beat_schedule(settings),
    }


class _LazyConfig(Mapping[str, Any]):
    """Celery configuration computed from settings on first read."""

    def __init__(self, load: Callable[[], Settings]) -> None:
        self._load = load

    @functools.cached_property
    def _data(self) -> dict[str, Any]:
        return celery_config(self._load())

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for `settings` (default: the process-wide settings, read lazily)."""
    # kombu's Redis transport, made to survive a Redis restart, for redis:// brokers (TLS
    # brokers, rediss://, keep kombu's own); see worker.delivery.broker.
    use_for_redis_urls()
    celery_app = Celery("imgprep", include=task_modules(), set_as_current=settings is None)
    celery_app.config_from_object(_LazyConfig(lambda: settings or get_settings()))
    celery_app.steps["consumer"].add(RestoreStranded)
    celery_app.steps["worker"].add(Heartbeat)
    celery_app.steps["worker"].add(PeerServerStep)  # serves only in host scope
    connect_signals()
    return celery_app


app = create_app()
