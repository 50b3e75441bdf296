"""Reading a source in a thread of its own, so the step can always stop it.

The next chunk of an image is read while the current one is written (`ReadAhead`). The reading
thread is a daemon that nobody ever waits for: whatever ends the transfer — the last chunk, an
error, a transfer that became too slow (`MinimumRate`), or the step's soft time limit
interrupting the wait — the consumer calls the source's `abort` (which shuts its sockets, so a
blocked read returns) and goes on with its cleanup at once. A server that sends one byte every
few seconds can therefore neither hold a worker and its cache lock until the hard time limit,
nor keep the soft time limit's cleanup waiting.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType

from domain.core.errors import SourceTooSlow

_END = object()


class MinimumRate:
    """Refuses a transfer that received fewer than `bytes_per_second` times `window_seconds` bytes
    in its last `window_seconds` (0 bytes per second: no minimum)."""

    def __init__(
        self,
        bytes_per_second: int,
        window_seconds: float,
        *,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bytes_per_second = bytes_per_second
        self.window = window_seconds
        self.what = what
        self.received = 0  # written by the reading thread only
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque([(clock(), 0)])

    def arrived(self, count: int) -> None:
        """`count` more bytes came from the source (called by the reading thread)."""
        self.received += count

    def check(self) -> None:
        """SourceTooSlow when the last window brought too few bytes."""
        if self.bytes_per_second <= 0:
            return
        now, received = self._clock(), self.received
        if now - self._samples[-1][0] >= self.window / 20:
            self._samples.append((now, received))
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        since, then = self._samples[0]
        elapsed = now - since
        if elapsed < self.window:
            return
        got = received - then
        if got < self.bytes_per_second * elapsed:
            raise SourceTooSlow(
                f"{self.what} sent {got} bytes in the last {elapsed:.0f} s "
                f"({got / elapsed:.0f} bytes/s), below the minimum of {self.bytes_per_second} "
                f"bytes/s over {self.window:g} s (fetch.min_bytes_per_second, "
                "fetch.rate_window_seconds): the source stalled or is too slow; will retry"
            )


class ReadAhead:
    """Iterate `chunks` (a generator run in a daemon thread) one chunk ahead of the consumer.

    `watch()` runs at least every `tick` seconds while the consumer waits and raises to stop
    the transfer; on any exit but the end of the chunks, `abort()` is called to unblock the
    reading thread, which is then left to finish on its own.
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        *,
        watch: Callable[[], None] = lambda: None,
        abort: Callable[[], None] = lambda: None,
        tick: float = 1.0,
    ) -> None:
        self._chunks = chunks
        self._watch = watch
        self._abort = abort
        self._tick = tick
        self._handoff: queue.Queue[object] = queue.Queue(maxsize=1)
        self._stopped = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._read, name="read-ahead", daemon=True)

    def __enter__(self) -> Iterator[bytes]:
        self._thread.start()
        return self._consume()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopped.set()
        if not self._ended:
            self._abort()

    def _consume(self) -> Iterator[bytes]:
        watched = time.monotonic()
        while True:
            try:
                item = self._handoff.get(timeout=self._tick)
            except queue.Empty:
                self._watch()
                watched = time.monotonic()
                continue
            if item is _END:
                self._ended = True
                return
            if isinstance(item, BaseException):
                raise item
            if time.monotonic() - watched >= self._tick:
                self._watch()
                watched = time.monotonic()
            assert isinstance(item, bytes)
            yield item

    def _read(self) -> None:
        try:
            for chunk in self._chunks:
                if not self._put(chunk):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(error)
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()

    def _put(self, item: object) -> bool:
        """Hand `item` over unless the consumer has gone; whether it was handed over."""
        while not self._stopped.is_set():
            try:
                self._handoff.put(item, timeout=0.5)
            except queue.Full:
                continue
            return True
        return False
