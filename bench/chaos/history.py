"""What happened during a campaign: every operation with its invoke and completion time and its
outcome, and every fault with its start and end. Times are seconds since the campaign started.

The workload thread writes operations and the nemesis thread writes faults; both go through one
lock, so the history can be read (and dumped as JSON) at any moment.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Outcome = Literal["pending", "ok", "error", "lost"]


@dataclass
class Op:
    """One operation sent by the client."""

    index: int
    id: str  # the Celery task id the client sent and waits on
    kind: str  # prepare, prepare_again, snapshot, delete, evict, bad_checksum, ...
    task: str  # imgprep.prepare_disk, ...
    request: dict[str, Any]
    invoke: float
    deadline: float  # after this the operation is late (lost once the late allowance is over)
    disk: str | None = None  # "<host>/<instance>/<disk>" for operations on one disk
    image: str | None = None  # catalogue name of the image, for prepares
    complete: float | None = None
    outcome: Outcome = "pending"
    result: dict[str, Any] | None = None
    error_class: str | None = None
    error_module: str | None = None
    error_message: str | None = None
    sends: int = 0  # attempts to publish the message (more than one while Redis was down)
    context: dict[str, Any] = field(default_factory=dict)  # what the checker needs to know

    @property
    def ended(self) -> bool:
        return self.outcome in ("ok", "error")

    @property
    def late(self) -> bool:
        """Ended after its deadline."""
        return self.ended and self.complete is not None and self.complete > self.deadline

    def window(self, now: float) -> tuple[float, float]:
        """When the operation could be affected by a fault: from invoke to its end (or now)."""
        return self.invoke, self.complete if self.complete is not None else now

    def describe(self) -> str:
        where = f" {self.disk}" if self.disk else ""
        image = f" image={self.image}" if self.image else ""
        return f"op#{self.index} {self.kind}{where}{image} (task {self.id})"


@dataclass
class Fault:
    """One fault the nemesis injected, with what it hit."""

    index: int
    kind: str  # kill_pool, kill_worker, pause_holder, redis_restart, stall_source
    start: float
    target: str
    end: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def overlaps(self, start: float, end: float, grace: float) -> bool:
        """Whether this fault was active during [start, end] (its effects last `grace` more)."""
        fault_end = (self.end if self.end is not None else end) + grace
        return self.start <= end and fault_end >= start


class History:
    """The operations and faults of one campaign."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.started = time.monotonic()
        self.ops: list[Op] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def add_op(self, op: Op) -> Op:
        with self._lock:
            self.ops.append(op)
        return op

    def end_op(
        self,
        op: Op,
        outcome: Outcome,
        *,
        result: dict[str, Any] | None = None,
        error: tuple[str, str, str] | None = None,
    ) -> None:
        """Record how `op` ended; `error` is (class, module, message)."""
        with self._lock:
            op.outcome = outcome
            op.complete = self.now() if outcome != "lost" else None
            op.result = result
            if error is not None:
                op.error_class, op.error_module, op.error_message = error

    def begin_fault(self, kind: str, target: str, **detail: Any) -> Fault:
        with self._lock:
            fault = Fault(
                index=len(self.faults), kind=kind, start=self.now(), target=target, detail=detail
            )
            self.faults.append(fault)
        return fault

    def end_fault(self, fault: Fault, **detail: Any) -> None:
        with self._lock:
            fault.end = self.now()
            fault.detail.update(detail)

    def faults_during(self, op: Op, grace: float) -> list[Fault]:
        start, end = op.window(self.now())
        with self._lock:
            return [f for f in self.faults if f.overlaps(start, end, grace)]

    def faults_by_kind(self) -> Counter[str]:
        with self._lock:
            return Counter(f.kind for f in self.faults)

    def outcomes_by_class(self) -> Counter[str]:
        """`ok`, `lost`, or the error class, counted over every operation."""
        with self._lock:
            return Counter(
                (op.error_class or "error") if op.outcome == "error" else op.outcome
                for op in self.ops
            )

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "seed": self.seed,
                "ops": [asdict(op) for op in self.ops],
                "faults": [asdict(fault) for fault in self.faults],
            }
