"""The collaborators a worker process hands to domain code, built once per process.

Built lazily, after the prefork pool forks, so every pool process has its own Redis
connections. Tasks call `runtime()`; domain functions receive the pieces they need.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import redis

from domain.cache.directory import ImageCache
from domain.cache.eviction import AgingPolicy, CacheManager
from domain.cache.fleet import Fleet
from domain.cache.peer_client import PeerOptions
from domain.cache.staging import FetchOptions
from domain.core.runner import Limits, Runner
from domain.disks.instance_disks import DiskContext
from domain.guest.ports import PrivilegedOperations
from domain.rbd.images import RbdContext
from domain.rbd.tool import CephAccess, RbdTool
from worker.privileges.helper_client import HelperClient
from worker.settings import Settings, get_settings
from worker.stores.redis_connect import COMMAND_TIMEOUT_SECONDS, redis_client
from worker.stores.redis_ledger import RedisDeviceLedger
from worker.stores.redis_locks import RedisLockFactory
from worker.stores.redis_peers import RedisPeerRegistry
from worker.stores.redis_rbd import RedisImportedImages, RedisTemporaries
from worker.stores.redis_references import RedisReferences


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
        return RedisReferences(self.redis, self.settings.cache_namespace)

    @property
    def locks_now(self) -> RedisLockFactory:
        """Locks that do not wait: for work that skips a busy resource (the cache manager)."""
        return lock_factory(self.redis, self.settings, wait=0.0)

    @property
    def fleet_locks(self) -> RedisLockFactory:
        """Locks of the whole fleet (no host namespace), that wait: host scope's peer choice."""
        return lock_factory(
            self.redis, self.settings, wait=self.settings.lock.wait_seconds, fleet=True
        )

    @property
    def fleet_locks_now(self) -> RedisLockFactory:
        """Locks of the whole fleet that do not wait: host scope's origin lease."""
        return lock_factory(self.redis, self.settings, wait=0.0, fleet=True)

    @property
    def qemu_limits(self) -> Limits:
        return Limits(
            cpu_seconds=self.settings.qemu.info_cpu_seconds,
            address_space_bytes=self.settings.qemu.info_address_space_bytes,
        )

    @property
    def aging_policy(self) -> AgingPolicy:
        """The cache manager's policy from settings (image_cache.*); references of canvases
        and disks go stale when results do."""
        configured = self.settings.image_cache
        return AgingPolicy(
            minimum_age_seconds=configured.remove_unused_original_minimum_age_seconds,
            max_bytes=configured.max_bytes,
            min_idle_seconds=configured.min_idle_seconds,
            stale_reference_seconds=float(self.settings.result_expires),
        )

    @property
    def cache_manager(self) -> CacheManager:
        """This host's cache manager; its locks do not wait (a busy entry is skipped)."""
        return CacheManager(
            cache=self.cache,
            references=self.references,
            locks=self.locks_now,
            instances_dir=self.settings.instances_dir,
            host=self.settings.host_id,
            runner=self.runner,
            limits=self.qemu_limits,
            removed=self._withdraw_copy,
        )

    def _withdraw_copy(self, key: str) -> None:
        """Host scope: peers stop asking this host for an entry its cache manager removed."""
        fleet = self.fleet
        if fleet is not None:
            fleet.registry.withdraw(key, fleet.host)

    @property
    def devices(self) -> RedisDeviceLedger:
        """The device records of this host's instance disks."""
        return RedisDeviceLedger(self.redis, self.settings.host_id)

    @property
    def privileged(self) -> PrivilegedOperations | None:
        """The privileged helper's client when privileges.helper_socket is set; None: the device
        steps run their privileged operations in this process."""
        socket_path = self.settings.privileges.helper_socket
        return HelperClient(Path(socket_path)) if socket_path else None

    @property
    def disk_context(self) -> DiskContext:
        """What the disk steps work with on this host."""
        return DiskContext(
            cache=self.cache,
            instances_dir=self.settings.instances_dir,
            host=self.settings.host_id,
            runner=self.runner,
            locks=self.locks,
            references=self.references,
            limits=self.qemu_limits,
            preallocate=self.settings.preallocate_images == "space",
        )

    @property
    def fleet(self) -> Fleet | None:
        """This host in the fleet (host scope), None in shared scope."""
        return self.fleet_with()

    def fleet_with(
        self, origin_gate: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    ) -> Fleet | None:
        """This host in the fleet (host scope), each origin download inside `origin_gate`."""
        if self.settings.image_cache.scope != "host":
            return None
        peer = self.settings.peer
        return Fleet(
            origin_gate=origin_gate,
            wait_seconds=self.settings.lock.wait_seconds,
            host=self.settings.host_id,
            url=self.settings.peer_url,
            registry=RedisPeerRegistry(self.redis, self.settings.result_expires, peer.secret),
            origin_locks=self.fleet_locks_now,
            choice_locks=self.fleet_locks,
            peers=PeerOptions(
                secret=peer.secret,
                connect_timeout_seconds=peer.connect_timeout_seconds,
                stall_seconds=peer.stall_seconds,
                allowed_networks=peer.allowed_networks,
            ),
        )

    @property
    def ceph_access(self) -> CephAccess:
        configured = self.settings.rbd
        return CephAccess(
            conf=configured.conf,
            user=configured.user,
            keyring=Path(configured.keyring) if configured.keyring else None,
            pool=configured.pool,
            images_pool=configured.images_pool,
            connect_timeout_seconds=configured.connect_timeout_seconds,
            command_timeout_seconds=configured.command_timeout_seconds,
            transfer_timeout_seconds=configured.transfer_timeout_seconds,
        )

    @property
    def rbd(self) -> RbdContext:
        """This host's Ceph cluster (rbd.*), with leases of the whole fleet: one cluster may
        serve many hosts."""
        return RbdContext(
            tool=RbdTool(self.ceph_access, self.runner),
            cluster_locks=self.fleet_locks,
            temporaries=RedisTemporaries(self.redis),
            imported=RedisImportedImages(self.redis),
            staging_dir=self.settings.state_dir / "rbd-imports",
            cache=self.cache,
            options=self.fetch_options,
        )

    @property
    def fetch_options(self) -> FetchOptions:
        return FetchOptions(
            policy=self.settings.fetch,
            limits=self.qemu_limits,
            force_raw=self.settings.fetch.force_raw,
        )


def lock_factory(
    client: redis.Redis, settings: Settings, *, wait: float, fleet: bool = False
) -> RedisLockFactory:
    """Lease locks as lock.* configures them, that wait up to `wait` seconds for a busy lock;
    named in this host's namespace (host scope) unless `fleet` (locks of the whole fleet)."""
    return RedisLockFactory(
        client,
        lease=settings.lock.lease_seconds,
        renew_every=settings.lock.renew_seconds,
        wait=wait,
        replica_ack=settings.lock.replica_ack_seconds,
        namespace="" if fleet else settings.cache_namespace,
    )


def build_runtime(settings: Settings) -> Runtime:
    client = redis_client(settings.coordination, settings.redis)
    return Runtime(
        settings=settings,
        redis=client,
        locks=lock_factory(client, settings, wait=settings.lock.wait_seconds),
        runner=Runner(default_timeout=settings.qemu.command_timeout_seconds),
    )


__all__ = ["COMMAND_TIMEOUT_SECONDS", "Runtime", "build_runtime", "redis_client", "runtime"]


@functools.cache
def runtime() -> Runtime:
    """This process's runtime, from the process-wide settings."""
    return build_runtime(get_settings())
