"""The broker transport: kombu's Redis transport, made to survive a Redis restart.

Two upstream behaviours, checked in kombu 5.7 and Celery 5.7, break a worker when Redis goes
away while it holds messages (a running step acknowledges late; a retry waits out its
countdown; a prefetched message waits for a free process):

* The worker dies. When the connection drops during a BRPOP, kombu's `Channel.close()` stops at
  the failed read, and the second close Celery makes finds the transport already torn down:
  `AttributeError: 'NoneType' object has no attribute 'hostname'` escapes as an "Unrecoverable
  error" and the worker exits. Acknowledging a message of that channel after reconnecting fails
  the same way. Here every channel keeps the connection parameters it was made with, so a
  channel whose transport is gone still closes, acknowledges and rejects through Redis.
* Messages wait an hour. On a lost connection Celery drops the requests it had not started yet
  and the countdowns of retries, trusting the broker to deliver their messages again; kombu's
  Redis transport does that when the channel closes, which fails while Redis is down. Those
  messages then stay among the unacknowledged ones until `visibility_timeout` passes. Here
  they are remembered (`stranded`), and `RestoreStranded`, a consumer bootstep that runs each
  time the worker has connected again, puts every one that no running step holds back at the
  head of its queue. The running steps acknowledge their own messages when they end.

`create_app` makes `redis://` URLs use this transport in its process (`use_for_redis_urls`),
so the URLs, Celery's banner and Flower's broker pages stay as they are.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import bootsteps
from celery.worker.state import active_requests
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis

log = structlog.get_logger(__name__)

TRANSPORT = "worker.broker:Transport"

# Delivery tags of messages that a lost connection left unacknowledged in Redis and that could
# not be put back then; the worker's main process restores them after reconnecting.
_stranded: set[str] = set()


def use_for_redis_urls() -> None:
    """Make kombu use `Transport` for `redis://` URLs in this process."""
    if kombu_transports.TRANSPORT_ALIASES.get("redis") != TRANSPORT:
        kombu_transports.TRANSPORT_ALIASES["redis"] = TRANSPORT
        # kombu caches the class of each alias it resolved; forget one resolved before this
        kombu_transports._transport_cache.pop("redis", None)


def stranded() -> set[str]:
    """The delivery tags waiting to be restored (a copy)."""
    return set(_stranded)


class QoS(kombu_redis.QoS):
    """Redis acknowledgement emulation that keeps what it could not restore."""

    def restore_unacked(self, client: Any = None) -> None:
        delivered = list(self._delivered)
        try:
            super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except self.channel.connection_errors as error:
            _stranded.update(str(tag) for tag in delivered)
            self._delivered.clear()
            log.warning(
                "unacked_messages_not_restored",
                messages=len(delivered),
                error=str(error),
                restored="after reconnecting",
            )


class Channel(kombu_redis.Channel):
    """A Redis channel that can reach Redis after its transport was closed."""

    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        known: dict[bool, dict[str, Any]] = self.__dict__.setdefault("_known_connparams", {})
        if self.connection.client is None and asynchronous in known:
            return dict(known[asynchronous])
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[no-untyped-call]
        known[asynchronous] = dict(params)
        return params


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with `Channel` above."""

    Channel = Channel


class RestoreStranded(bootsteps.StartStopStep):  # type: ignore[misc]
    """After (re)connecting: put back the messages a lost connection stranded."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        restore_stranded(c.connection.default_channel)


def restore_stranded(channel: Any) -> int:
    """Restore the stranded messages no running step holds; how many were restored."""
    if not _stranded:
        return 0
    running = {
        str(request.message.delivery_tag)
        for request in tuple(active_requests)
        if request.message is not None
    }
    restored = 0
    for tag in sorted(_stranded):
        if tag not in running:
            try:
                channel.qos.restore_by_tag(tag, leftmost=True)
            except channel.connection_errors as error:
                log.warning("stranded_messages_not_restored", error=str(error))
                return restored
            restored += 1
        _stranded.discard(tag)
    log.warning("stranded_messages_restored", restored=restored, left_to_running_steps=len(running))
    return restored
