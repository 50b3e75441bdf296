"""Redis lease locks: SET NX PX with a random token, owner-only release and extension in Lua,
background renewal, a fence check before publishing, and waiters woken by the release itself.

Waiting is not polling. A releasing holder pushes one element on `imgprep:wake:<name>`; a waiter
blocks on that list with BLPOP for at most the lock's remaining lease, so it wakes within a
Redis round-trip of a release, and within one lease period of a holder that died without
releasing (its key expires). This is the signal-list technique of python-redis-lock.

A blocking command must end before its client's own socket timeout (redis-py 8 gives every
client 5 s unless told otherwise), or the client reports "Timeout reading from socket" on a
healthy Redis. Each BLPOP therefore blocks at most half of the client's socket timeout; a wait
longer than that is several BLPOPs, each followed by another attempt to take the lock.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis
import structlog
from redis.exceptions import RedisError

from domain.core.errors import CoordinationUnavailable, LockBusy, LockLost
from worker.metrics import lock_waited
from worker.stores.lua import script
from worker.stores.replies import text

log = structlog.get_logger(__name__)

LOCK_PREFIX = "imgprep:lock:"
WAKE_PREFIX = "imgprep:wake:"  # one-element lists that wake a waiter; they expire with the lease
FENCE_KEY = "imgprep:fence"

_ACQUIRE = script("worker.stores", "lock_acquire.lua")

_RELEASE = script("worker.stores", "lock_release.lua")

_EXTEND = script("worker.stores", "lock_extend.lua")

_SHORTEST_BLOCK = 0.001  # BLPOP with timeout 0 would block forever
_REDIS_PAUSE = 1.0  # between attempts of a waiter that cannot reach Redis
# A renewal that could not reach Redis (a restart, a failover) is tried again this soon, not a
# whole renewal period later: the lease must be extended on the new master before it runs out.
_RENEW_RETRY = 0.5
_ROLE_CACHE_SECONDS = 10.0  # how long a master's count of replicas is trusted
_replicas_seen: dict[int, tuple[float, int]] = {}  # connection pool → (until, replicas)


def attached_replicas(client: redis.Redis) -> int:
    """How many replicas the master `client` talks to has (ROLE; trusted for 10 s). 0 when it
    cannot tell: a lock is then not held up waiting for replicas."""
    key = id(client.connection_pool)
    now = time.monotonic()
    cached = _replicas_seen.get(key)
    if cached is not None and cached[0] > now:
        return cached[1]
    try:
        role = client.execute_command("ROLE")  # type: ignore[no-untyped-call]
        replicas = len(role[2]) if text(role[0]) == "master" else 0
    except (RedisError, IndexError, TypeError):
        replicas = 0
    _replicas_seen[key] = (now + _ROLE_CACHE_SECONDS, replicas)
    return replicas


def longest_block(client: redis.Redis) -> float | None:
    """The longest BLPOP `client` can wait for: half its socket timeout (None: no limit)."""
    timeout = client.get_connection_kwargs().get("socket_timeout")
    return float(timeout) / 2 if timeout else None


def holder_identity() -> str:
    """host:pid, the human-readable part of a lock token."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseLock:
    """A lease lock on one resource name; use as a context manager or acquire/release."""

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        lease: float,
        renew_every: float,
        wait: float,
        replica_ack: float = 0.0,
    ) -> None:
        if renew_every >= lease:
            raise ValueError("renew_every must be shorter than the lease")
        self.client = client
        self.replica_ack = replica_ack
        self.name = name
        self.key = LOCK_PREFIX + name
        self.signal_key = WAKE_PREFIX + name
        self.lease_ms = max(1, int(lease * 1000))
        self.renew_every = renew_every
        self.wait = wait
        self.token = f"{holder_identity()}:{uuid.uuid4().hex}"
        self._fence: int | None = None
        self._lost = threading.Event()
        self._last_renewed = 0.0
        self._renewal_failed = False
        self._acquire_script = client.register_script(_ACQUIRE)
        self._release_script = client.register_script(_RELEASE)
        self._extend_script = client.register_script(_EXTEND)
        self._longest_block = longest_block(client)

    # -- acquiring ---------------------------------------------------------------------------

    @property
    def fence(self) -> int:
        if self._fence is None:
            raise LockLost(f"lock {self.name} is not held")
        return self._fence

    @property
    def lost(self) -> bool:
        """True once renewal found the lease gone (expired, or taken over)."""
        return self._lost.is_set()

    def acquire(self, wait: float | None = None) -> int:
        """Take the lock, waiting up to `wait` seconds; return the fencing token.

        A Redis that stops answering meanwhile (a restart) is waited for too, within the same
        budget: the waiter tries again every second, and only a budget spent without Redis
        ends in CoordinationUnavailable."""
        budget = self.wait if wait is None else wait
        started = time.monotonic()
        deadline = started + budget
        while True:
            try:
                fence, pttl = self._redis(
                    self._acquire_script,
                    keys=[self.key, FENCE_KEY],
                    args=[self.token, self.lease_ms],
                )
            except CoordinationUnavailable as error:
                self._pause_for_redis(error, deadline)
                continue
            if fence:
                lock_waited(self.name, time.monotonic() - started, acquired=True)
                self._fence = int(fence)
                self._lost.clear()
                self._start_renewing()
                self._confirm_replicated()
                log.debug(
                    "lock_acquired",
                    lock=self.name,
                    fence=self._fence,
                    waited_seconds=round(time.monotonic() - started, 4),
                )
                return self._fence
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                lock_waited(self.name, time.monotonic() - started, acquired=False)
                raise LockBusy(
                    f"lock {self.name} is still held by another worker after {budget:.0f} s; "
                    "the step will retry"
                )
            # pttl -2: released between SET and PTTL, try again at once; -1: no expiry (never
            # set by us), wait a lease at most.
            expires_in = pttl / 1000 if pttl > 0 else (self.lease_ms / 1000 if pttl == -1 else 0)
            block = max(
                _SHORTEST_BLOCK, min(remaining, expires_in, self._longest_block or remaining)
            )
            if pttl != -2:
                try:
                    self._redis(self.client.blpop, [self.signal_key], timeout=block)
                except CoordinationUnavailable as error:
                    self._pause_for_redis(error, deadline)

    def _confirm_replicated(self) -> None:
        """Wait (up to `replica_ack` s) for a replica to have the lock (WAIT 1), so that a
        failover just after taking it does not forget it; only when the master has replicas.
        A lock no replica confirmed is still used: the fence check before publishing, on
        whichever server is the master then, decides (README, "Redis with Sentinel")."""
        if self.replica_ack <= 0 or not attached_replicas(self.client):
            return
        wait = self.replica_ack
        if self._longest_block is not None:
            wait = min(wait, self._longest_block)
        try:
            acknowledged = self.client.execute_command(  # type: ignore[no-untyped-call]
                "WAIT", 1, max(1, int(wait * 1000))
            )
        except RedisError as error:
            log.info("lock_replication_unconfirmed", lock=self.name, error=str(error))
            return
        if not acknowledged:
            log.warning("lock_replication_unconfirmed", lock=self.name, waited_seconds=wait)

    def _pause_for_redis(self, error: CoordinationUnavailable, deadline: float) -> None:
        """Wait a moment for Redis to come back, or give up when the wait's budget is spent."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise error
        log.info("lock_wait_redis_unavailable", lock=self.name, error=str(error))
        time.sleep(min(_REDIS_PAUSE, remaining))

    def release(self) -> bool:
        """Release if still the owner and wake one waiter; False when the lease was already lost."""
        self._stop_renewing()
        if self._fence is None:
            return False
        self._fence = None
        released = bool(
            self._redis(
                self._release_script,
                keys=[self.key, self.signal_key],
                args=[self.token, self.lease_ms],
            )
        )
        if not released:
            log.warning("lock_release_found_lease_lost", lock=self.name)
        return released

    def ensure_held(self) -> None:
        """The fence before a commit: atomically check ownership and extend the lease."""
        if self._fence is None or self._lost.is_set():
            raise LockLost(f"lock {self.name} was lost before the result could be published")
        if not self._redis(self._extend_script, keys=[self.key], args=[self.token, self.lease_ms]):
            self._lost.set()
            raise LockLost(
                f"lock {self.name} was taken over by another worker; this worker's result is "
                "discarded"
            )

    def __enter__(self) -> LeaseLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except CoordinationUnavailable:
            # The lease expires on its own; the original error, if any, matters more.
            if exc is None:
                raise
            log.warning("lock_release_failed", lock=self.name)

    # -- renewal -------------------------------------------------------------------------------

    def _start_renewing(self) -> None:
        self._last_renewed = time.monotonic()
        RENEWER.add(self)

    def _stop_renewing(self) -> None:
        RENEWER.remove(self)

    def _renew(self) -> bool:
        """Extend the lease once (the renewer calls this); False when renewal should stop."""
        if self._fence is None:
            return False
        try:
            extended = self._extend_script(keys=[self.key], args=[self.token, self.lease_ms])
        except RedisError as error:
            if time.monotonic() - self._last_renewed > self.lease_ms / 1000:
                log.warning("lock_lease_lapsed", lock=self.name, error=str(error))
                self._lost.set()
                return False
            log.info("lock_renewal_retrying", lock=self.name, error=str(error))
            self._renewal_failed = True
            return True
        self._renewal_failed = False
        if not extended:
            if self._fence is not None:  # not a release that raced the renewal
                log.warning("lock_lease_lost", lock=self.name)
                self._lost.set()
            return False
        self._last_renewed = time.monotonic()
        return True

    # -- plumbing ---------------------------------------------------------------------------------

    def _redis(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except RedisError as error:
            raise CoordinationUnavailable(
                f"Redis unavailable for lock {self.name}: {error}"
            ) from None


class _Renewer:
    """One thread per process renews every lease the process holds, each every
    `renew_every` seconds. A short critical section (most of them) ends before its first
    renewal, so taking a lock costs no thread of its own."""

    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._due: dict[LeaseLock, float] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, lock: LeaseLock) -> None:
        with self._wake:
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._start()
            self._due[lock] = time.monotonic() + lock.renew_every
            self._wake.notify()

    def remove(self, lock: LeaseLock) -> None:
        with self._wake:
            self._due.pop(lock, None)

    def _start(self) -> None:
        # after a fork the parent's thread and leases are not this process's
        self._pid = os.getpid()
        self._due = {}
        self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [lock for lock, at in self._due.items() if at <= now]
                if not due:
                    self._wake.wait(min(self._due.values()) - now if self._due else None)
                    continue
                for lock in due:
                    self._due[lock] = now + lock.renew_every
            for lock in due:
                if not lock._renew():
                    self.remove(lock)
                elif lock._renewal_failed:
                    self.soon(lock)

    def soon(self, lock: LeaseLock) -> None:
        """Renew `lock` again shortly (its last renewal could not reach Redis)."""
        with self._wake:
            if lock in self._due:
                self._due[lock] = time.monotonic() + min(lock.renew_every, _RENEW_RETRY)


RENEWER = _Renewer()


class RedisLockFactory:
    """Makes LeaseLocks with the configured lease, renewal and wait."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        lease: float,
        renew_every: float,
        wait: float,
        replica_ack: float = 0.0,
        namespace: str = "",
    ) -> None:
        self.client = client
        self.lease = lease
        self.renew_every = renew_every
        self.wait = wait
        self.replica_ack = replica_ack
        # prefixed to every name: "<host>/" in host scope, so each host's cache has its own locks
        self.namespace = namespace

    def __call__(self, name: str) -> LeaseLock:
        return LeaseLock(
            self.client,
            self.namespace + name,
            lease=self.lease,
            renew_every=self.renew_every,
            wait=self.wait,
            replica_ack=self.replica_ack,
        )
