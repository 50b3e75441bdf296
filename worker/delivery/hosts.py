"""Which hosts have live workers: heartbeats in Redis, and what becomes of a silent host's work.

Every worker that consumes its host's queue `imgprep.host.<host>` announces the host every
`hosts.heartbeat_seconds` from its main process (`Heartbeat`, a worker bootstep): the sorted set
`imgprep:hosts` holds each host's last heartbeat, in Redis's own clock. A host is *silent* when
no worker of it has announced it for a while; Redis being down does not count against a host
(worker.delivery.liveness, the broker's consumers' mechanism too: the outages since a host's last
heartbeat are left out of its silence), so an outage does not look like dead hosts.

* Entry tasks refuse a request for a host that never announced itself or has been silent for
  `hosts.silent_after_seconds`: `HostUnavailable` (permanent), at once, before anything is
  pinned or queued. A request for the entry worker's own host needs no check.
* A host that dies after accepting work leaves messages in its queue that nobody will take.
  Live workers sweep (`sweep`, run beside the heartbeat, one sweeper at a time): the messages of
  every host silent for `hosts.abandon_after_seconds` — in its queue, or delivered to one of its
  dead workers and still unacknowledged — are failed with `HostUnavailable` under their
  operation's id (the step's own id and every step chained after it, the caller's among them),
  and the pending references of their canvases are released. A step of a chord is counted in
  its chord, so the chord's body runs (or fails) once its other steps have ended; a chord's step
  whose task names a result for a failure (`failed_result`, e.g. a precache host's report with
  every image failed) ends with that result instead. Celery's own message expiry
  (`expires`) does not do this: it marks only the expired step as revoked and leaves the
  caller's id pending forever, and nothing reads a queue whose host is gone.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from celery import Celery, bootsteps, states
from celery.app.task import Context
from redis.exceptions import RedisError

from domain.cache.references import pending_holder
from domain.core.errors import HostUnavailable, LockBusy
from domain.core.redaction import redacted_text
from worker.app.routing import host_queue
from worker.app.signals import announce_failure, operation_id
from worker.delivery.liveness import Liveness
from worker.settings import HostSettings, Settings, get_settings
from worker.stores.lua import script
from worker.stores.redis_journal import RedisJournal
from worker.stores.redis_locks import LeaseLock
from worker.stores.redis_references import RedisReferences
from worker.stores.replies import as_bytes

log = structlog.get_logger(__name__)

HOSTS_KEY = "imgprep:hosts"  # host → its last heartbeat, Redis's clock
CLOCK_KEY = "imgprep:hosts:clock"  # Redis's run id at the last heartbeat, and its time
OUTAGES_KEY = "imgprep:hosts:outages"  # "<last heartbeat before> <Redis's start>" of restarts
SWEEP_LOCK = "hosts:sweep"
UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered, unacknowledged messages
UNACKED_INDEX_KEY = "unacked_index"

_TAKE_UNACKED = script("worker.delivery", "take_unacked.lua")


@dataclass(frozen=True)
class Silence:
    """How long a host has not been heard from; `never`: it never announced itself."""

    host: str
    seconds: float
    never: bool = False

    def describe(self, threshold: float, setting: str) -> str:
        if self.never:
            queue = host_queue(self.host)
            return (
                f"no imgprep worker of host {self.host} has ever announced itself (is a worker "
                f"running there, with IMGPREP_HOST_ID={self.host}, consuming {queue}?)"
            )
        return (
            f"host {self.host} has had no live imgprep worker for {self.seconds:.0f} s "
            f"(more than {setting}={threshold:.0f})"
        )


class HostRegistry:
    """The heartbeats of hosts in Redis (worker.delivery.liveness, as the broker's consumers)."""

    def __init__(self, client: redis.Redis, policy: HostSettings, keep_seconds: float) -> None:
        self.client = client
        self.policy = policy
        self.liveness = Liveness(HOSTS_KEY, CLOCK_KEY, OUTAGES_KEY, max(1, int(keep_seconds)))

    def beat(self, host: str) -> None:
        self.liveness.beat(self.client, host)

    def silences(self) -> dict[str, Silence]:
        """Every host ever announced (within `keep_seconds`), with its silence."""
        return {
            host: Silence(host, seconds)
            for host, seconds in self.liveness.silences(self.client).items()
        }

    def silence(self, host: str) -> Silence:
        return self.silences().get(host, Silence(host, float("inf"), never=True))

    def forget(self, host: str) -> None:
        self.liveness.forget(self.client, host)


def require_live_host(host: str, settings: Settings, client: redis.Redis) -> None:
    """Refuse (HostUnavailable) a request for a host no live worker has announced. The entry
    worker's own host is live by definition: this worker is of it."""
    why = unavailable_hosts([host], settings, client).get(host)
    if why is not None:
        raise HostUnavailable(f"{why}; the request was refused and nothing was done")


def unavailable_hosts(
    hosts: Sequence[str], settings: Settings, client: redis.Redis
) -> dict[str, str]:
    """The hosts of `hosts` that no live worker serves (never announced, or silent for
    `hosts.silent_after_seconds`), each with why, in words naming the host and the setting. The
    entry worker's own host is live by definition."""
    policy = settings.hosts
    registry = HostRegistry(client, policy, settings.result_expires)
    others = [host for host in dict.fromkeys(hosts) if host != settings.host_id]
    if len(others) == 1:
        heard = {others[0]: registry.silence(others[0])}
    else:
        heard = registry.silences() if others else {}
    down = {}
    for host in others:
        silence = heard.get(host) or Silence(host, float("inf"), never=True)
        if silence.never or silence.seconds > policy.silent_after_seconds:
            down[host] = silence.describe(
                policy.silent_after_seconds, "IMGPREP_HOSTS__SILENT_AFTER_SECONDS"
            )
    return down


def live_hosts(settings: Settings, client: redis.Redis) -> list[str]:
    """Every host a live worker announced within `hosts.silent_after_seconds`."""
    silences = HostRegistry(client, settings.hosts, settings.result_expires).silences()
    return sorted(
        host
        for host, silence in silences.items()
        if silence.seconds <= settings.hosts.silent_after_seconds
    )


# -- the sweep ---------------------------------------------------------------------------------


def sweep(app: Celery, client: redis.Redis, settings: Settings) -> int:
    """Fail the queued and unacknowledged messages of hosts silent for
    `hosts.abandon_after_seconds`; how many messages were failed. One sweeper at a time; hosts
    silent for longer than `result_expires` are forgotten (no canvas can still send them work)."""
    policy = settings.hosts
    registry = HostRegistry(client, policy, settings.result_expires)
    silences = registry.silences().values()
    abandoned = [s for s in silences if s.seconds > policy.abandon_after_seconds]
    if abandoned:
        held = _unacked_queues(client)
        abandoned = [
            s for s in abandoned if host_queue(s.host) in held or client.llen(host_queue(s.host))
        ]
    failed = 0
    if abandoned:
        lock = LeaseLock(client, SWEEP_LOCK, lease=30.0, renew_every=10.0, wait=0.0)
        try:
            lock.acquire()
        except LockBusy:  # another worker sweeps now
            return 0
        try:
            for silence in abandoned:
                failed += _sweep_host(app, client, settings, silence)
        finally:
            lock.release()
    for silence in silences:
        if silence.seconds > settings.result_expires:
            registry.forget(silence.host)
    return failed


def _unacked_queues(client: redis.Redis) -> set[str]:
    """The queues of the messages delivered to workers and not acknowledged yet."""
    return {json.loads(entry)[2] for _tag, entry in client.hscan_iter(UNACKED_KEY)}


def _sweep_host(app: Celery, client: redis.Redis, settings: Settings, silence: Silence) -> int:
    queue = host_queue(silence.host)
    error = HostUnavailable(
        silence.describe(
            settings.hosts.abandon_after_seconds, "IMGPREP_HOSTS__ABANDON_AFTER_SECONDS"
        )
        + f"; its queue {queue} was abandoned and this request failed without running there"
    )
    failed = 0
    # Queued: the oldest is at the right (kombu pushes left, pops right). The message is failed
    # before it is removed, so a sweeper that dies between the two leaves it to the next one.
    while (raw := client.lindex(queue, -1)) is not None:
        _fail(app, client, settings, as_bytes(raw), error)
        client.lrem(queue, -1, as_bytes(raw))  # type: ignore[arg-type]
        failed += 1
    # Delivered to a worker of the host that died before acknowledging it.
    take = client.register_script(_TAKE_UNACKED)
    for tag, entry in list(client.hscan_iter(UNACKED_KEY)):
        payload, _exchange, routing_key = json.loads(entry)
        if routing_key != queue:
            continue
        if take(keys=[UNACKED_KEY, UNACKED_INDEX_KEY], args=[tag]) is not None:
            _fail(app, client, settings, json.dumps(payload).encode(), error)
            failed += 1
    if failed:
        log.warning("abandoned_host_swept", host=silence.host, queue=queue, failed=failed)
    return failed


def _fail(
    app: Celery, client: redis.Redis, settings: Settings, raw: bytes, error: HostUnavailable
) -> None:
    """Store `error` as the failure of the message's step and of every step after it."""
    try:
        message = parse_message(raw)
    except (ValueError, KeyError, TypeError) as problem:
        log.error("abandoned_message_unreadable", error=str(problem))
        return
    # A chord member's request names its group and the chord's body, so that storing its end
    # also counts it in the chord (Celery's on_chord_part_return): the body runs, or fails with
    # ChordError, once every member has ended; without them the body would wait for ever.
    request = Context(
        id=message.task_id,
        task=message.task,
        root_id=message.root_id,
        chain=message.chain,
        group=message.group,
        group_index=message.group_index,
        chord=message.chord,
        args=message.args,
        kwargs=message.kwargs,
        delivery_info={"routing_key": message.queue},
    )
    meta = app.backend.get_task_meta(message.task_id)
    if meta.get("status") in states.READY_STATES:
        # The step ended before its worker died unacknowledged: its result stands (a step
        # chained after it is in the queue, swept in turn). Counted in its chord again, in case
        # the worker died between the two: Celery counts a chord's part once per task id.
        if request.chord:
            app.backend.on_chord_part_return(request, meta["status"], meta.get("result"))
        log.info("abandoned_message_had_ended", task_id=message.task_id, state=meta["status"])
        return
    # the pins first: once the failure is stored, the caller may look at the cache
    released = RedisReferences(client).forget(pending_holder(message.root_id))
    result = _abandoned_result(app, message, error)
    # what `imgprep status` shows for the step (its dead worker's record says it started)
    RedisJournal(client, settings.result_expires).finished(
        message.root_id,
        message.task_id,
        message.task,
        "FAILURE",
        redacted_text(f"{type(error).__name__}: {error}"),
    )
    if result is not None:  # the chord's body runs with it, and announces the operation
        app.backend.mark_as_done(message.task_id, result, request=request)
        announce_failure(app, message.task_id, error)
    else:
        app.backend.mark_as_failure(message.task_id, error, request=request, call_errbacks=False)
        for task_id in {message.task_id, message.operation_id}:  # what Flower knows, by events
            announce_failure(app, task_id, error)
    log.warning(
        "abandoned_request_failed",
        task_id=message.task_id,
        task_name=message.task,
        operation=message.operation_id,
        reported=result is not None,
        released_bases=released,
        error=redacted_text(str(error)),
    )


def _abandoned_result(app: Celery, message: QueuedMessage, error: HostUnavailable) -> Any:
    """What the message's step ends with instead of `error` as a part of a chord (the task's
    `failed_result`, e.g. a precache host's report with every image failed), or None: the step
    fails with `error`."""
    task = app.tasks.get(message.task)
    if task is None or message.chain or not message.chord:
        return None
    try:
        return task.failed_result(message.args, message.kwargs, error)
    except Exception as problem:  # an unreadable request: the step fails with `error` instead
        log.error(
            "abandoned_result_failed",
            task_name=message.task,
            error_class=type(problem).__name__,
            error=redacted_text(str(problem)),
        )
        return None


@dataclass(frozen=True)
class QueuedMessage:
    """What the sweep needs of a Celery protocol 2 message."""

    task_id: str
    task: str
    root_id: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    chain: list[dict[str, Any]]
    group: str | None = None
    group_index: int | None = None
    chord: dict[str, Any] | None = None

    @property
    def operation_id(self) -> str:
        """The id the caller waits on: the last step's, or the chord's body's."""
        body = (self.chord or {}).get("options", {}).get("task_id")
        return operation_id(self.chain) or (str(body) if body else None) or self.task_id


def parse_message(raw: bytes) -> QueuedMessage:
    envelope = json.loads(raw)
    headers = envelope["headers"]
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, kwargs, embed = json.loads(body)
    routing = envelope.get("properties", {}).get("delivery_info", {})
    group_index = headers.get("group_index")
    return QueuedMessage(
        task_id=str(headers["id"]),
        task=str(headers["task"]),
        root_id=str(headers.get("root_id") or headers["id"]),
        queue=str(routing.get("routing_key", "")),
        args=list(args),
        kwargs=dict(kwargs),
        chain=list((embed or {}).get("chain") or []),
        group=str(headers["group"]) if headers.get("group") else None,
        group_index=int(group_index) if group_index is not None else None,
        chord=dict((embed or {}).get("chord") or {}) or None,
    )


# -- the worker's part -------------------------------------------------------------------------


class Heartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker bootstep: a thread of the main process that announces this worker's host every
    `hosts.heartbeat_seconds` (when the worker consumes the host's queue) and then sweeps."""

    label = "imgprep heartbeat"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        settings = get_settings()
        consumes = host_queue(settings.host_id) in worker.app.amqp.queues.consume_from
        if consumes:  # announced before the worker reports ready, so its host is live by then
            from worker.stores.redis_connect import redis_client

            client = redis_client(settings.coordination, settings.redis)
            try:
                HostRegistry(client, settings.hosts, settings.result_expires).beat(settings.host_id)
            except RedisError as error:
                log.info("host_heartbeat_failed", error=str(error))
            finally:
                client.close()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run,
            args=(worker.app, settings, consumes),
            name="imgprep-heartbeat",
            daemon=True,
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, app: Celery, settings: Settings, consumes: bool) -> None:
        from worker.stores.redis_connect import redis_client

        client = redis_client(settings.coordination, settings.redis)
        registry = HostRegistry(client, settings.hosts, settings.result_expires)
        try:
            while True:
                try:
                    if consumes:
                        registry.beat(settings.host_id)
                    sweep(app, client, settings)
                except RedisError as error:
                    log.info("host_heartbeat_failed", error=str(error))
                except Exception as error:  # the heartbeat must outlive any one failure
                    log.error("host_heartbeat_crashed", error_class=type(error).__name__)
                if self._stop.wait(settings.hosts.heartbeat_seconds):
                    return
        finally:
            client.close()
