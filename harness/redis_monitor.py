"""What Redis runs, in Redis's own clock: a MONITOR connection followed by a thread, keeping the
publishes (LPUSH) and the workers' claims (worker/delivery/broker.py's claim script), for the tests
and benchmarks that measure how long a message waits before a worker claims it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import redis

from worker.delivery.broker import CLAIM_SCRIPT

CLAIM_MARK = "local n = #KEYS - 4"  # a line of the claim script, as MONITOR shows its EVAL
STOP = "imgprep-monitor-stop"
assert CLAIM_MARK in CLAIM_SCRIPT


@dataclass
class CommandLog:
    """Each command Redis runs that interests us: (time, kind, detail) with kind "push" (detail:
    the queue), "claim", or "record" (an HSET on `record_key`, for a baseline's own records)."""

    client: redis.Redis
    record_key: str = ""
    seen: list[tuple[float, str, str]] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> CommandLog:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._follow, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("MONITOR did not start")
        time.sleep(0.1)  # on before whatever the caller does next
        return self

    def stop(self) -> None:
        """End the MONITOR connection (after every command sent before this call)."""
        self.client.echo(STOP)
        if self._thread is not None:
            self._thread.join(10)

    def _follow(self, ready: threading.Event) -> None:
        with self.client.monitor() as monitor:  # type: ignore[no-untyped-call]
            ready.set()
            for entry in monitor.listen():
                command = str(entry["command"])
                at = float(entry["time"])
                if command.startswith("LPUSH "):
                    self.seen.append((at, "push", command.split(" ", 2)[1]))
                elif command.startswith("EVAL ") and CLAIM_MARK in command:
                    self.seen.append((at, "claim", ""))
                elif self.record_key and command.startswith(f"HSET {self.record_key} "):
                    self.seen.append((at, "record", ""))
                elif STOP in command:
                    return

    def waits(self, queues: tuple[str, ...], taken_by: str = "claim") -> list[float]:
        """For each push to one of `queues`, the seconds until the next `taken_by` command:
        when one message is in flight at a time, how long it waited to be claimed."""
        waits = []
        ordered = sorted(self.seen)
        for index, (pushed, kind, queue) in enumerate(ordered):
            if kind != "push" or queue not in queues:
                continue
            for at, later, _ in ordered[index + 1 :]:
                if later == taken_by:
                    waits.append(at - pushed)
                    break
        return waits
