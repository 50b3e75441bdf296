"""Pre-caching: images into one host's cache before any instance asks for them (Nova's
aggregate image pre-cache, `imgprep.precache`).

Each image is looked up first (`already_cached`), else fetched as a prepare would (`cached`;
in host scope from peers when it can). An image that fails is reported with its error class and
message and does not stop the others; a transient error is retried by the step when it can
still retry. `precache_concurrency` bounds how many images precache steps fetch from their
origin at once, fleet-wide: each origin fetch holds one of that many slot locks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import structlog

from domain.cache.directory import ImageCache, cache_key, find_cached
from domain.cache.precache_models import PrecacheHostRequest, PrecacheOutcome, PrecacheReport
from domain.core.errors import ImgprepError, LockBusy, TransientError
from domain.core.models import CachedImage, ImageSource
from domain.core.ports import LockFactory, Progress

log = structlog.get_logger(__name__)

SLOT_POLL_SECONDS = 0.2


def precache_host(
    request: PrecacheHostRequest,
    *,
    cache: ImageCache,
    fetch: Callable[[ImageSource, Progress], CachedImage],
    progress: Callable[[int, ImageSource], Progress],
    will_retry: Callable[[TransientError], bool],
) -> PrecacheReport:
    """Every image of the request in this host's cache, one after the other; the report."""
    results = []
    for index, source in enumerate(request.images):
        key = cache_key(source.image_id)
        try:
            if find_cached(source, cache) is not None:
                outcome = PrecacheOutcome(
                    host=request.host, image_id=source.image_id, key=key, outcome="already_cached"
                )
            else:
                fetch(source, progress(index, source))
                outcome = PrecacheOutcome(
                    host=request.host, image_id=source.image_id, key=key, outcome="cached"
                )
        except ImgprepError as error:
            if isinstance(error, TransientError) and will_retry(error):
                raise
            log.warning(
                "precache_failed",
                image_key=key,
                error_class=type(error).__name__,
                error=str(error),
            )
            outcome = PrecacheOutcome(
                host=request.host,
                image_id=source.image_id,
                key=key,
                outcome="failed",
                error_class=type(error).__name__,
                error_message=str(error),
            )
        results.append(outcome)
    return PrecacheReport(results=results)


def host_failed(host: str, images: Sequence[ImageSource], error: BaseException) -> PrecacheReport:
    """The report of a host whose step could not run or did not end (no live worker, its
    workers died, its time limit): every image `failed` with `error`."""
    return PrecacheReport(
        results=[
            PrecacheOutcome(
                host=host,
                image_id=image.image_id,
                key=cache_key(image.image_id),
                outcome="failed",
                error_class=type(error).__name__,
                error_message=str(error),
            )
            for image in images
        ]
    )


def precache_report(reports: list[PrecacheReport]) -> PrecacheReport:
    """One report of every host's, ordered by host then image as requested."""
    return PrecacheReport(
        results=sorted(
            (outcome for report in reports for outcome in report.results),
            key=lambda outcome: outcome.host,
        )
    )


@contextlib.contextmanager
def origin_slot(locks: LockFactory, count: int, *, wait_seconds: float) -> Iterator[None]:
    """Hold one of `count` fleet-wide slots (`locks` must not wait) while fetching from an
    origin; LockBusy when none came free within `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    while True:
        for index in range(count):
            lease = locks(f"precache-origin:{index}")
            try:
                lease.__enter__()
            except LockBusy:
                continue
            try:
                yield
            finally:
                lease.__exit__(None, None, None)
            return
        if time.monotonic() > deadline:
            raise LockBusy(
                f"all {count} precache origin slots stayed busy for {wait_seconds:.0f} s "
                "(precache_concurrency); will retry"
            )
        time.sleep(SLOT_POLL_SECONDS)
