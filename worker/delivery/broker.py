"""The broker transport: kombu's Redis transport, made to lose nothing when a worker or Redis dies.

Upstream behaviours, checked in kombu 5.7 and Celery 5.7, that lose or strand messages:

* **A message leaves Redis before it is recorded.** kombu takes a message with BRPOP and only
  then writes it to the `unacked` hash: a worker killed in between (or whose connection drops
  while a BRPOP reply waits unread in its socket, which kombu keeps there while the worker has
  no free slot) loses the message for good; no visibility timeout brings it back. Here a message
  is taken by a Lua script that pops it *and* records it (with its owner, this process) in one
  step (the claim); nothing leaves a queue unrecorded. How an idle worker learns that there is
  something to claim is below.
* **What a dead worker held waits for the visibility timeout** (an hour by default): prefetched
  messages, retries waiting out their countdown, running steps. Here each worker's main process
  beats every `consumer_beat_interval` (2 s) in `unacked_consumers` (Redis's clock), and every
  live worker puts back, at the head of their queues, the messages owned by a process silent
  for `consumer_silent_after` (20 s of Redis's uptime: the first beat after a restart records
  the outage, and silences leave outages out: worker.delivery.liveness, which the hosts'
  heartbeats share). An acknowledgement removes a record only while it is its own, so a step
  put back and taken by another worker stays recorded for it.
* **The worker dies on a Redis restart.** When the connection drops during a BRPOP, kombu's
  `Channel.close()` stops at the failed read, and the second close Celery makes finds the
  transport torn down: `AttributeError: 'NoneType' object has no attribute 'hostname'` escapes as
  an "Unrecoverable error". Here every channel keeps the connection parameters it was made with.
* **Messages stranded by a lost connection.** Celery drops the requests it had not started and
  the countdowns of retries, trusting the broker to deliver them again; kombu puts them back
  when the channel closes, which fails while Redis is down. `RestoreStranded`, a consumer
  bootstep that runs each time the worker has connected again, puts back every message this
  process owns that no running step holds.

**How an idle worker waits: a peek per list, each on a connection of its own.** A script cannot
block, so the wait is a command that takes nothing: `BLMOVE q q RIGHT RIGHT` (the list rotated
onto itself) returns when `q` holds a message and leaves it there. BLMOVE watches one list, so
each list the channel consumes (each queue and each of its priority lists: 8 for a worker on the
shared queue and its host's, with kombu's four priority steps) has a peek waiting on a connection
of its own, polled by the worker's event loop beside kombu's sockets
(worker/delivery/broker_peeks.py). A push wakes its peek in the same turn of Redis's event loop,
whatever its `hz`; the channel claims at once on its own connection (which waits for nothing
meanwhile), claims again while claims find messages, and sends the peeks again once a claim found
every list empty: a message pushed after that claim is seen by the peek sent after it. A message on
any queue is claimed in about a millisecond, however many queues the worker consumes; before, one
connection watched one queue at a time for `peek_timeout` (0.1 s) in turn, and Redis at its default
hz 10 ended such a short block up to 0.1 s late, so a message waited up to 0.2 s, and every hop of a
canvas 0.1 to 0.2 s. A peek blocks for `peek_timeout` (now 1 s) and is then sent again, and the
channel claims at least that often (a wake-up missed for any reason costs a second, never a
message); a peek without a reply for `peek_timeout` plus `health_check_interval` (a half-open
connection) is replaced. A worker killed between a peek and its claim leaves the message where it
was. A lost peek connection is a lost connection, raised to Celery's consumer as a lost BRPOP
connection is, so Redis restarts and failovers go as before. Costs: those connections (about 2 KiB
of Redis's memory each while it waits), one reply per list and one claim per idle second (an idle
worker sends Redis fewer commands than before, 23 a second against 60); every idle worker wakes for
a message on the shared queue and one claims it, as before. Rejected: keyspace notifications (a
server setting every Redis and replica must carry, and notices lost with their connection),
client-side tracking (wakes on every change by anyone, the other workers' claims included, and
its state dies with the connection), short polls (latency traded for load).

Sentinel URLs (`sentinel://h1:26379;sentinel://h2:26379/0`, with `master_name` and
`sentinel_kwargs` in `broker_transport_options`) get the same fixes over kombu's Sentinel
transport (`SentinelTransport`): the channel asks the Sentinels for the master each time it
connects, so after a failover the worker reconnects to the new master, restores what the lost
connection stranded, and takes messages with the same claim script.

Consumers with `no_ack` (Flower's and `celery inspect`'s replies), a `global_keyprefix`, or a
Redis that refuses BLMOVE or scripts for good (older than 6.2, or an ACL) keep kombu's BRPOP. Any
other error of a peek or a claim (a master turned replica unblocking its clients, READONLY,
BUSY, LOADING) counts as a lost connection: the worker reconnects and claims atomically again.
Publishing is kombu's (LPUSH on the queue's list), so plain Celery clients in any language are
unaffected. `create_app` makes `redis://` URLs use this transport in its process
(`use_for_redis_urls`), so the URLs, Celery's banner and Flower stay as they are.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from queue import Empty
from time import monotonic, time
from typing import Any
from urllib.parse import urlsplit

import structlog
from celery import bootsteps
from celery.worker.state import active_requests
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.sentinel import Sentinel

from worker.delivery.broker_peeks import PeekPoller, QueuePeeks, as_connection_error, refused
from worker.delivery.liveness import Liveness
from worker.stores.lua import script
from worker.stores.redis_urls import DEFAULT_SENTINEL_PORT
from worker.stores.replies import text

log = structlog.get_logger(__name__)

TRANSPORT = "worker.delivery.broker:Transport"
SENTINEL_TRANSPORT = "worker.delivery.broker:SentinelTransport"
OWNER_KEY = "unacked_owner"  # delivery tag → the consumer process that took it
CONSUMERS_KEY = "unacked_consumers"  # consumer process → its last beat, Redis's clock
CLOCK_KEY = "unacked_clock"  # Redis's run id at the last beat, and that beat's time
OUTAGES_KEY = "unacked_outages"  # "<last beat before> <Redis's start>" of recent restarts
CONSUMERS = Liveness(CONSUMERS_KEY, CLOCK_KEY, OUTAGES_KEY)

CLAIM_SCRIPT = script("worker.delivery", "claim.lua")

_FORGET = script("worker.delivery", "forget.lua")

# Delivery tags of messages that a lost connection left unacknowledged in Redis and that could
# not be put back then; the worker's main process restores them after reconnecting.
_stranded: set[str] = set()
# Delivery tags the claim script recorded, until the QoS takes the message.
_recorded: set[str] = set()
_consumer_ids: dict[int, str] = {}  # pid → id: a forked child is a consumer of its own


def use_for_redis_urls() -> None:
    """Make kombu use `Transport` for `redis://` URLs, and `SentinelTransport` for
    `sentinel://` ones, in this process."""
    for alias, transport in (("redis", TRANSPORT), ("sentinel", SENTINEL_TRANSPORT)):
        if kombu_transports.TRANSPORT_ALIASES.get(alias) != transport:
            kombu_transports.TRANSPORT_ALIASES[alias] = transport
            # kombu caches the class of each alias it resolved; forget one resolved before this
            kombu_transports._transport_cache.pop(alias, None)


def consumer_id() -> str:
    """This process as the owner of the messages it takes: host, pid and a random part."""
    pid = os.getpid()
    if pid not in _consumer_ids:
        _consumer_ids[pid] = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:12]}"
    return _consumer_ids[pid]


def stranded() -> set[str]:
    """The delivery tags waiting to be restored (a copy)."""
    return set(_stranded)


class QoS(kombu_redis.QoS):
    """Redis acknowledgement emulation with owners, and that keeps what it could not restore."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in _recorded:  # the claim script recorded it, with its owner
            _recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
        else:  # taken by kombu's BRPOP or basic_get: recorded as kombu does, without an owner
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]

    def ack(self, delivery_tag: str) -> None:
        self._forget(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)  # type: ignore[no-untyped-call]
        else:
            self._forget(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def _forget(self, delivery_tag: str) -> None:
        with self.channel.conn_or_acquire() as client:
            client.eval(
                _FORGET,
                3,
                self.unacked_key,
                self.unacked_index_key,
                OWNER_KEY,
                delivery_tag,
                consumer_id(),
            )

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        return super()._remove_from_indices(delivery_tag, pipe).hdel(OWNER_KEY, delivery_tag)  # type: ignore[no-untyped-call]

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

    def restore_owned(self, tag: str, owner: str, client: Any, leftmost: bool = False) -> bool:
        """Put the message back on its queue if `owner` still holds it; whether it did."""

        def restore_transaction(pipe: Any) -> None:
            holder = pipe.hget(OWNER_KEY, tag)
            record = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            restored[0] = False
            if holder is None or text(holder) != owner:
                return
            self._remove_from_indices(tag, pipe)
            if record:
                payload, exchange, routing_key = json.loads(text(record))
                self.channel._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
                restored[0] = True

        restored = [False]  # of the last try: a transaction is tried again when a key changed
        client.transaction(restore_transaction, self.unacked_key, OWNER_KEY)
        return restored[0]

    def restore_orphans(self, silent_after: float) -> int:
        """Put back the messages of consumers silent for `silent_after` seconds (one worker at a
        time); forget silent consumers that hold nothing. How many were put back."""
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            pipe.hgetall(OWNER_KEY)
            CONSUMERS.queue_reads(pipe)
            owners, *replies = pipe.execute()
            heard = CONSUMERS.silences_from(replies)
            me = consumer_id()
            held: dict[str, list[str]] = {}
            for tag, owner in owners.items():
                held.setdefault(text(owner), []).append(text(tag))
            dead = {
                c for c in set(heard) | set(held) if c != me and heard.get(c, 1e9) > silent_after
            }
            orphans = [(tag, c) for c in dead for tag in held.get(c, [])]
            restored = 0
            if orphans:
                try:
                    with kombu_redis.Mutex(
                        client, self.unacked_mutex_key, self.unacked_mutex_expire
                    ):
                        restored = sum(self.restore_owned(t, c, client) for t, c in orphans)
                except kombu_redis.MutexHeld:
                    return 0
                log.warning(
                    "dead_consumers_messages_restored",
                    consumers=sorted({c for _, c in orphans}),
                    restored=restored,
                )
            CONSUMERS.forget(client, *(c for c in dead if c not in held))
            return restored


class Channel(kombu_redis.Channel):
    """A Redis channel that takes messages atomically, learns of them from peeks on connections
    of their own, and can reach Redis after its transport was closed."""

    QoS = QoS
    peek_timeout = 1.0
    consumer_beat_interval = 2.0
    consumer_silent_after = 20.0
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "peek_timeout",
        "consumer_beat_interval",
        "consumer_silent_after",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._no_ack_queues: set[str] = set()
        self._claiming = False  # a claim awaits its reply on the channel's connection
        self._claim_due = True  # a peek saw a message, or the last claim took one
        self._claim_sent_at = float("-inf")
        self._peeks: QueuePeeks | None = None
        self._queues_changed = True  # the lists to watch are to be worked out again
        self._use_brpop = False  # Redis refused BLMOVE or the claim script: kombu's way
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        known: dict[bool, dict[str, Any]] = self.__dict__.setdefault("_known_connparams", {})
        # A channel closed after a lost connection has no transport (`connection` None) and a
        # transport closed has no client: the parameters it had still reach Redis (a producer
        # in a pool process publishes on such a channel while kombu revives it). Without them,
        # a lost connection, which kombu's ensure() retries, not an AttributeError that fails
        # the task (seen after a Redis restart: a prepare failed with "'NoneType' object has
        # no attribute 'client'").
        if self.connection is None or self.connection.client is None:
            if asynchronous in known:
                return dict(known[asynchronous])
            if self.connection is None:
                raise RedisConnectionError("the channel's connection is closed")
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[no-untyped-call]
        known[asynchronous] = dict(params)
        return params

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("no_ack", args[0] if args else False):
            self._no_ack_queues.add(queue)
        self._queues_changed = True
        return super().basic_consume(queue, *args, **kwargs)  # type: ignore[no-untyped-call]

    def basic_cancel(self, consumer_tag: str) -> Any:
        self._no_ack_queues.discard(self._tag_to_queue.get(consumer_tag, ""))
        self._queues_changed = True
        return super().basic_cancel(consumer_tag)  # type: ignore[no-untyped-call]

    @property
    def takes_atomically(self) -> bool:
        """Whether this channel takes messages with the claim script (else kombu's BRPOP)."""
        return (
            self.ack_emulation
            and not self.global_keyprefix
            and not self._use_brpop
            and not self._no_ack_queues.intersection(self.active_queues)
        )

    @property
    def peeks(self) -> QueuePeeks:
        """The peeks at this channel's lists (made at first use)."""
        if self._peeks is None:
            self._peeks = QueuePeeks(
                # a connection as the channel's pool would make it (plain, TLS, Unix socket, or
                # to the master the Sentinels name), but of the peek's own
                connect=lambda: self.pool.connection_class(**self.pool.connection_kwargs),
                poller=self.connection.cycle,
                timeout=self.peek_timeout,
                grace=self.health_check_interval or self.peek_timeout,
                on_message=self._wake,
                on_refused=self._refused,
            )
        return self._peeks

    def _brpop_start(self, timeout: float | None = None) -> None:
        # Called by kombu's poller on every turn of the event loop while the channel can take a
        # message and has no reply to wait for: claim when a claim is due, else let the peeks
        # wait (the channel's own connection then waits for nothing).
        now = monotonic()
        if (  # nothing to do, the common case of an idle turn: answered cheaply
            not (self._claim_due or self._queues_changed)
            and self._peeks is not None
            and self._peeks.settled(now)
            and now - self._claim_sent_at < self.peek_timeout
        ):
            return
        if not self.takes_atomically:
            self._close_peeks()
            super()._brpop_start(timeout)  # type: ignore[no-untyped-call]
            return
        self._queues_changed = False
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [
            self._q_for_pri(queue, pri)  # type: ignore[no-untyped-call]
            for pri in self.priority_steps
            for queue in queues
        ]
        # Besides what the peeks report, a claim every peek_timeout: a wake-up missed for any
        # reason costs a second, never a message.
        if self._claim_due or now - self._claim_sent_at >= self.peek_timeout:
            self._claim(keys)
        else:
            self.peeks.watch(keys)

    def _claim(self, keys: list[str]) -> None:
        connection = self.client.connection
        self._in_poll = connection
        self._claiming, self._claim_due = True, False
        self._claim_sent_at = self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        tail = (self.unacked_key, self.unacked_index_key, OWNER_KEY, CONSUMERS_KEY)
        arguments = (consumer_id(), time())
        connection.send_command("EVAL", CLAIM_SCRIPT, len(keys) + 4, *keys, *tail, *arguments)

    def _brpop_read(self, **options: Any) -> bool:
        if not self._claiming:  # kombu's BRPOP, or a connection closed while idle
            return bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        self._claiming = False
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except self.ResponseError as error:
                if refused(error):  # Redis < 6.2, or scripts refused
                    self._refused(error)
                    raise Empty() from error
                self.client.connection.disconnect()
                raise as_connection_error(error, "claim") from error
            if not reply:
                raise Empty()
            self._claim_due = True  # there may be more
            key, item, recorded = reply
            queue = text(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            payload = json.loads(text(item))
            if recorded:
                _recorded.add(payload["properties"]["delivery_tag"])
            self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]

    def _wake(self) -> None:
        """A peek saw a message: claim now if the channel can take one (as kombu's poller would
        at the loop's next turn, after the timers due by then), else once it can."""
        self._claim_due = True
        if self.active_queues and self.qos.can_consume():
            self.connection.cycle._register_BRPOP(self)

    def _refused(self, error: ResponseError) -> None:
        self._use_brpop = True
        self._queues_changed = True  # the next turn switches to kombu's BRPOP
        log.error("broker_takes_with_brpop", error=str(error))

    def _close_peeks(self) -> None:
        peeks, self._peeks = self._peeks, None
        if peeks is not None:
            peeks.close()

    def close(self) -> None:
        self._close_peeks()
        super().close()  # type: ignore[no-untyped-call]

    def beat(self) -> None:
        """Announce this process as a live consumer."""
        with self.conn_or_acquire() as client:
            CONSUMERS.beat(client, consumer_id())


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with `Channel` above, its peeks polled beside kombu's sockets,
    and the consumers' heartbeat."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.cycle = PeekPoller()  # type: ignore[assignment]

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[no-untyped-call]
        cycle: Any = self.cycle
        cycle.use_loop(loop)
        old = getattr(cycle, "_consumers_tref", None)
        if old is not None:
            old.cancel()
        interval = connection.client.transport_options.get(
            "consumer_beat_interval", Channel.consumer_beat_interval
        )
        cycle._consumers_tref = loop.call_repeatedly(interval, self.tend_consumers)

    def tend_consumers(self) -> None:
        """Beat for this process and put back what dead consumers held (from the event loop)."""
        cycle: Any = self.cycle
        for channel in list(cycle._channels):
            if not channel.active_queues or not channel.takes_atomically:
                continue
            try:
                channel.beat()
                channel.qos.restore_orphans(channel.consumer_silent_after)
            except channel.connection_errors as error:
                log.info("consumer_heartbeat_failed", error=str(error))
            except Exception as error:  # the heartbeat must outlive any one failure
                log.error("consumer_heartbeat_crashed", error=str(error), exc_info=True)
            return


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """`Channel` over kombu's Sentinel channel: the master is asked of the Sentinels each time
    a connection is made, so the channel follows a failover."""

    from_transport_options = (  # type: ignore[assignment]
        *Channel.from_transport_options,
        "master_name",
        "min_other_sentinels",
        "sentinel_kwargs",
        "sentinel_fanout_compat",
    )

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        # kombu reads the Sentinels from the connection, which is gone once the transport
        # closed (a channel closed after a lost connection still restores its messages, as
        # `Channel._connparams` allows): keep them from the first time.
        known: list[str] = self.__dict__.setdefault("_known_sentinel_urls", [])
        if self.connection.client is not None:
            known[:] = list(self.connection.client.alt)
        connparams = self._connparams(asynchronous)
        params = {k: v for k, v in connparams.items() if k not in ("host", "port")}
        sentinels = []
        for url in known:
            parsed = urlsplit(url)
            if parsed.scheme == "sentinel" and parsed.hostname:
                sentinels.append((parsed.hostname, parsed.port or DEFAULT_SENTINEL_PORT))
        if not sentinels:
            sentinels.append((connparams["host"], connparams["port"]))
        manager = Sentinel(
            sentinels,
            min_other_sentinels=getattr(self, "min_other_sentinels", 0),
            sentinel_kwargs=getattr(self, "sentinel_kwargs", None),
            **params,
        )
        if asynchronous:
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        master_name = getattr(self, "master_name", None)
        if not master_name:
            raise ValueError("'master_name' transport option must be specified.")
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        master = manager.master_for(master_name, Redis, **credentials)
        return master.connection_pool


class SentinelTransport(Transport, kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with the fixes of `Transport`."""

    Channel = SentinelChannel
    default_port = DEFAULT_SENTINEL_PORT


class RestoreStranded(bootsteps.StartStopStep):  # type: ignore[misc]
    """After (re)connecting: put back the messages a lost connection stranded."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        restore_stranded(c.connection.default_channel)


def restore_stranded(channel: Any) -> int:
    """Restore the messages this process holds that no running step holds (stranded by a lost
    connection, or taken just before it was lost); how many were restored."""
    running = {
        str(request.message.delivery_tag)
        for request in tuple(active_requests)
        if request.message is not None
    }
    tags = set(_stranded)
    me = consumer_id()
    try:
        with channel.conn_or_acquire() as client:
            owned = client.hgetall(OWNER_KEY)
    except channel.connection_errors as error:
        log.warning("stranded_messages_not_restored", error=str(error))
        return 0
    tags |= {text(tag) for tag, owner in owned.items() if text(owner) == me}
    if not tags:
        return 0
    restored = 0
    for tag in sorted(tags - running):
        try:
            channel.qos.restore_by_tag(tag, leftmost=True)
        except channel.connection_errors as error:
            log.warning("stranded_messages_not_restored", error=str(error))
            return restored
        restored += 1
        _stranded.discard(tag)
    _stranded.difference_update(running)
    log.warning("stranded_messages_restored", restored=restored, left_to_running_steps=len(running))
    return restored
