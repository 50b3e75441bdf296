"""Every Redis client imgprep makes, from one place: a plain client for a `redis://` URL, and for
a Sentinel URL a client of the current master (`Sentinel(...).master_for(name)`), which asks the
Sentinels again whenever its connection fails or the server it reached turns out to be a replica
(a failover), so it follows the master.

Every client has an explicit socket timeout (redis-py 8 would give it 5 s, which breaks waits
longer than that on a healthy Redis); blocking commands wait at most half of it
(worker.stores.redis_locks.longest_block). The Sentinels themselves answer within
`redis.sentinel_timeout_seconds`.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import Sentinel

from worker.settings import RedisSettings
from worker.stores.redis_urls import is_sentinel, parse_sentinel

# No command of ours takes this long on a healthy Redis: a reply later than this means the
# connection is dead (a host gone without closing it), and the command fails instead of hanging
# the step. Blocking waits (lock waiters' BLPOP) block at most half of it at a time
# (worker.stores.redis_locks.longest_block), so they never run into it.
COMMAND_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0


def redis_client(
    url: str,
    connection: RedisSettings | None = None,
    *,
    socket_timeout: float | None = COMMAND_TIMEOUT_SECONDS,
    socket_connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    health_check_interval: float = 15,
    decode_responses: bool = False,
    **options: Any,
) -> redis.Redis:
    """A client of the Redis at `url` (of its master, for a Sentinel URL): an explicit read
    timeout, quick connects, keep-alive, and a health check of connections idle for 15 s."""
    configured = connection or RedisSettings()
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": health_check_interval,
        "decode_responses": decode_responses,
        **options,
    }
    password = configured.password.get_secret_value() or None
    if not is_sentinel(url):
        if password:
            kwargs["password"] = password  # the URL's own credentials win (redis-py)
        return redis.Redis.from_url(url, **kwargs)
    if not configured.master_name:
        raise ValueError("a Sentinel URL needs the master's name: set IMGPREP_REDIS__MASTER_NAME")
    master: redis.Redis = sentinel(url, configured, **kwargs).master_for(configured.master_name)
    return master


def sentinel(url: str, connection: RedisSettings, **kwargs: Any) -> Sentinel:
    """The Sentinels of a Sentinel URL; `kwargs` configure the connections to the master."""
    target = parse_sentinel(url)
    password = target.password or connection.password.get_secret_value() or None
    return Sentinel(
        list(target.sentinels),
        sentinel_kwargs=sentinel_options(connection),
        db=target.db,
        username=target.username,
        password=password,
        **kwargs,
    )


def sentinel_options(connection: RedisSettings) -> dict[str, Any]:
    """How to talk to the Sentinels themselves (redis-py's and kombu's `sentinel_kwargs`)."""
    options: dict[str, Any] = {
        "socket_timeout": connection.sentinel_timeout_seconds,
        "socket_connect_timeout": min(CONNECT_TIMEOUT_SECONDS, connection.sentinel_timeout_seconds),
    }
    if connection.sentinel_password.get_secret_value():
        options["password"] = connection.sentinel_password.get_secret_value()
    return options
