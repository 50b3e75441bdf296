"""The private internals of kombu, Celery, billiard and redis-py that imgprep overrides or calls
are still there, with the signatures imgprep was written against.

worker/delivery/broker.py, worker/delivery/broker_peeks.py, worker/app/pool.py,
worker/app/results.py and worker/app/redacting.py subclass upstream classes and override or call
methods that are not part of any public API. A release that renames one, or changes its parameters,
would break message delivery silently (the override would simply stop being called). pyproject.toml
bounds those libraries to the minors tested; this test is what fails first when the bounds are
raised and something moved.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

# (module, class or None, attribute, the signature imgprep relies on; None: only that it exists)
INTERNALS: list[tuple[str, str | None, str, str | None]] = [
    # worker/delivery/broker.py: the channel that claims atomically
    ("kombu.transport.redis", "Channel", "_connparams", "(self, asynchronous=False)"),
    ("kombu.transport.redis", "Channel", "_brpop_start", "(self, timeout=None)"),
    ("kombu.transport.redis", "Channel", "_brpop_read", "(self, **options)"),
    ("kombu.transport.redis", "Channel", "basic_consume", "(self, queue, *args, **kwargs)"),
    ("kombu.transport.redis", "Channel", "basic_cancel", "(self, consumer_tag)"),
    ("kombu.transport.redis", "Channel", "_q_for_pri", "(self, queue, pri)"),
    ("kombu.transport.redis", "Channel", "_flush_brpop_reauth", "(self)"),
    ("kombu.transport.redis", "Channel", "conn_or_acquire", "(self, client=None)"),
    (
        "kombu.transport.redis",
        "Channel",
        "_do_restore_message",
        "(self, payload, exchange, routing_key, pipe, leftmost=False)",
    ),
    ("kombu.transport.redis", "Channel", "from_transport_options", None),
    ("kombu.transport.redis", "Channel", "priority_steps", None),
    ("kombu.transport.redis", "Channel", "close", "(self)"),
    ("kombu.transport.redis", "Channel", "pool", None),
    ("kombu.transport.redis", "Channel", "health_check_interval", None),
    ("kombu.transport.redis", "Channel", "_brpop_sent_at", None),
    # worker/delivery/broker_peeks.py: the peeks, polled beside kombu's sockets. kombu's poller
    # calls `_register_BRPOP`, hence `Channel._brpop_start`, on every turn of the event loop while a
    # channel can take a message and awaits no reply: that is when the channel claims or peeks.
    ("kombu.transport.redis", "MultiChannelPoller", "__init__", "(self)"),
    ("kombu.transport.redis", "MultiChannelPoller", "handle_event", "(self, fileno, event)"),
    ("kombu.transport.redis", "MultiChannelPoller", "on_poll_start", "(self)"),
    ("kombu.transport.redis", "MultiChannelPoller", "_register_BRPOP", "(self, channel)"),
    ("kombu.transport.redis", "MultiChannelPoller", "eventflags", None),
    ("kombu.transport.redis", "Transport", "__init__", "(self, *args, **kwargs)"),
    ("kombu.asynchronous.hub", "Hub", "add_reader", "(self, fds, callback, *args)"),
    ("kombu.asynchronous.hub", "Hub", "remove_reader", "(self, fd)"),
    # a peek's own connection: made from the channel's pool's class and arguments (plain, TLS,
    # Unix or Sentinel-managed alike), its reply read when its socket is readable
    ("redis.connection", "ConnectionPool", "connection_kwargs", None),
    ("redis.connection", "Connection", "send_command", "(self, *args, **kwargs)"),
    ("redis.connection", "Connection", "read_response", None),
    ("redis.connection", "Connection", "connect", "(self)"),
    # worker/delivery/broker.py: acknowledgements with owners
    ("kombu.transport.redis", "QoS", "append", "(self, message, delivery_tag)"),
    ("kombu.transport.redis", "QoS", "ack", "(self, delivery_tag)"),
    ("kombu.transport.redis", "QoS", "reject", "(self, delivery_tag, requeue=False)"),
    ("kombu.transport.redis", "QoS", "restore_unacked", "(self, client=None)"),
    (
        "kombu.transport.redis",
        "QoS",
        "restore_by_tag",
        "(self, tag, client=None, leftmost=False)",
    ),
    ("kombu.transport.redis", "QoS", "_remove_from_indices", "(self, delivery_tag, pipe=None)"),
    ("kombu.transport.virtual", "QoS", "append", "(self, message, delivery_tag)"),
    ("kombu.transport.virtual", "QoS", "ack", "(self, delivery_tag)"),
    ("kombu.transport.redis", None, "Mutex", "(client, name, expire)"),
    ("kombu.transport.redis", None, "MutexHeld", None),
    # worker/delivery/broker.py: the Sentinel channel and the event loop
    (
        "kombu.transport.redis",
        "SentinelChannel",
        "_sentinel_managed_pool",
        "(self, asynchronous=False)",
    ),
    (
        "kombu.transport.redis",
        "Transport",
        "register_with_event_loop",
        "(self, connection, loop)",
    ),
    ("kombu.transport", None, "_transport_cache", None),
    ("kombu.transport", None, "TRANSPORT_ALIASES", None),
    ("celery.worker.state", None, "active_requests", None),
    # worker/app/pool.py: a pool process SIGKILLed at start is replaced
    ("celery.concurrency.prefork", "TaskPool", "did_start_ok", "(self)"),
    # worker/app/results.py: the redacting result backend
    (
        "celery.backends.redis",
        "RedisBackend",
        "_get_result_meta",
        "(self, result, state, traceback, request, format_date=True, encode=False)",
    ),
    ("celery.backends.redis", "RedisBackend", "prepare_exception", "(self, exc, serializer=None)"),
    (
        "celery.backends.redis",
        "RedisBackend",
        "mark_as_failure",
        "(self, task_id, exc, traceback=None, request=None, store_result=True, "
        "call_errbacks=True, state='FAILURE')",
    ),
    ("celery.backends.redis", "RedisBackend", "exception_to_python", "(self, exc)"),
    ("celery.backends.redis", "SentinelBackend", "_get_result_meta", None),
    ("celery.exceptions", None, "TimeLimitExceeded", None),
    # worker/app/redacting.py: every message a task sends goes through apply_async
    (
        "celery.app.task",
        "Task",
        "apply_async",
        "(self, args=None, kwargs=None, task_id=None, producer=None, link=None, "
        "link_error=None, shadow=None, **options)",
    ),
]


def _label(item: tuple[str, str | None, str, str | None]) -> str:
    module, owner, name, _ = item
    return ".".join(part for part in (module, owner, name) if part)


@pytest.mark.parametrize("item", INTERNALS, ids=_label)
def test_an_upstream_internal_imgprep_relies_on_is_unchanged(
    item: tuple[str, str | None, str, str | None],
) -> None:
    module_name, owner_name, name, expected = item
    module = importlib.import_module(module_name)
    owner = getattr(module, owner_name) if owner_name else module
    assert hasattr(owner, name), f"{_label(item)} is gone: its override is no longer called"
    if expected is not None:
        found = str(inspect.signature(getattr(owner, name)))
        assert found == expected, f"{_label(item)} changed its signature: {found}"


def test_the_overrides_in_the_broker_match_what_they_override() -> None:
    """Each method worker.delivery.broker overrides keeps the parameters of the method it
    replaces."""
    from kombu.transport import redis as kombu_redis

    from worker.delivery import broker, broker_peeks

    pairs = [
        (
            broker.Channel,
            kombu_redis.Channel,
            ["_connparams", "_brpop_start", "basic_cancel", "close"],
        ),
        (broker_peeks.PeekPoller, kombu_redis.MultiChannelPoller, ["handle_event"]),
        (broker.QoS, kombu_redis.QoS, ["append", "ack", "reject", "_remove_from_indices"]),
        (broker.SentinelChannel, kombu_redis.SentinelChannel, ["_sentinel_managed_pool"]),
    ]
    for ours, theirs, names in pairs:
        for name in names:
            mine = list(inspect.signature(getattr(ours, name)).parameters)
            upstream = list(inspect.signature(getattr(theirs, name)).parameters)
            assert mine == upstream, f"{ours.__name__}.{name}: {mine} != {upstream}"
