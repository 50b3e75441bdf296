"""The collaborators a worker process hands to domain code, built once per process.

Built lazily, after the prefork pool forks, so every pool process has its own Redis
connections. Tasks call `runtime()`; domain functions receive the pieces they need.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import redis

from domain.cache.fetch import FetchOptions, ImageCache
from domain.core.runner import Limits, Runner
from worker.redis_locks import RedisLockFactory
from worker.redis_references import RedisReferences
from worker.settings import Settings, get_settings


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    redis: redis.Redis
    locks: RedisLockFactory
    runner: Runner

    @property
    def cache(self) -> ImageCache:
        return ImageCache(self.settings.cache_dir)

    @property
    def references(self) -> RedisReferences:
        return RedisReferences(self.redis)

    @property
    def locks_now(self) -> RedisLockFactory:
        """Locks that do not wait: for work that skips a busy resource (the cache manager)."""
        return RedisLockFactory(
            self.redis,
            lease=self.settings.lock.lease_seconds,
            renew_every=self.settings.lock.renew_seconds,
            wait=0.0,
        )

    @property
    def qemu_limits(self) -> Limits:
        return Limits(
            cpu_seconds=self.settings.qemu.info_cpu_seconds,
            address_space_bytes=self.settings.qemu.info_address_space_bytes,
        )

    @property
    def fetch_options(self) -> FetchOptions:
        return FetchOptions(
            policy=self.settings.fetch,
            limits=self.qemu_limits,
            force_raw=self.settings.fetch.force_raw,
        )


# No command of ours takes this long on a healthy Redis: a reply later than this means the
# connection is dead (a host gone without closing it), and the command fails instead of hanging
# the step. Blocking waits (lock waiters' BLPOP) block at most half of it at a time
# (worker.redis_locks.longest_block), so they never run into it.
COMMAND_TIMEOUT_SECONDS = 30.0


def redis_client(url: str) -> redis.Redis:
    """A client for coordination: an explicit read timeout (redis-py 8 would give it 5 s),
    quick connects, keep-alive, and a health check of connections idle for 15 s."""
    return redis.Redis.from_url(
        url,
        socket_timeout=COMMAND_TIMEOUT_SECONDS,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=15,
        decode_responses=False,
    )


def build_runtime(settings: Settings) -> Runtime:
    client = redis_client(settings.coordination)
    return Runtime(
        settings=settings,
        redis=client,
        locks=RedisLockFactory(
            client,
            lease=settings.lock.lease_seconds,
            renew_every=settings.lock.renew_seconds,
            wait=settings.lock.wait_seconds,
        ),
        runner=Runner(default_timeout=settings.qemu.command_timeout_seconds),
    )


@functools.cache
def runtime() -> Runtime:
    """This process's runtime, from the process-wide settings."""
    return build_runtime(get_settings())
