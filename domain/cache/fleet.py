"""The fetch step in host scope: each host fills its own cache, from peers when it can.

A host that needs an image takes the same steps as in shared scope (domain.core.publish: look,
take the host's lease `cache:<key>`, stage into its own temporary, verify, publish), but stages
the bytes from wherever they are cheapest:

1. a peer that has the entry complete (the least loaded of them, chosen at random among equals);
2. else a peer that is fetching it (cut-through: within what that peer has on disk, which the
   registry records as it grows), preferring one nobody streams from yet, so a burst forms a
   chain in which every link carries the image once;
3. else the origin, by the one host that holds the fleet-wide lease `origin:<key>`; the others
   wait for it to announce its copy, and stream from it.

A peer is never trusted more than the origin. The bytes are hashed as they arrive and checked,
once complete, against the request's checksum when it names one, else against the digest recorded
by the host that verified them (what the host that downloaded from the origin found). A copy of a
published entry converted to raw is checked against the entry's digest, which the first host to
publish it recorded, and only when the source digest recorded with it is the request's checksum:
digests of another version vouch for nothing. The registry's records are signed by the hosts
that wrote them (worker.stores.redis_peers), so nobody without `peer.secret` can vouch for
bytes or point a host at a peer; nothing a checksum rejects is ever published
(domain.cache.staging.stage_entry checks it again). The bytes are then inspected as any
download is. A
peer that dies, stalls (no byte for `peer.stall_seconds`) or refuses is dropped, and the transfer
resumes from the byte where it stopped, from another peer or from the origin (a Range request;
from the first byte when no digest can vouch for what came before). A peer whose bytes turn out
wrong is dropped for good and its copy withdrawn from the registry; the transfer starts again.

Who chooses a peer records its choice (`upstream`) under the fleet-wide lock `peers:<key>`, so
concurrent choices see each other and never form a cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from domain.cache.directory import CONVERTED, ImageCache, cache_key, find_cached
from domain.cache.download import download_into
from domain.cache.peer_client import PeerClient, PeerFailed, PeerOptions
from domain.cache.peers import ORIGIN, Content, ImageDigests, PeerCopy, compatible
from domain.cache.ports import PeerRegistry
from domain.cache.staging import FetchOptions, Verified, check_checksum, stage_entry
from domain.cache.writer import ImageWriter
from domain.core.errors import (
    ChecksumMismatch,
    CoordinationUnavailable,
    LockBusy,
    SourceUnavailable,
)
from domain.core.models import CachedImage, ImageSource
from domain.core.ports import LockFactory, Progress, no_progress
from domain.core.publish import Staged, publish_once
from domain.core.runner import Runner
from domain.core.urls import redact

log = structlog.get_logger(__name__)

MAX_RANGE = 64 * 2**20  # bytes asked of a peer in one request
WRONG_BYTES_ROUNDS = 4  # transfers started again after wrong bytes before giving up
ANNOUNCE_EVERY_BYTES = 2**20
ANNOUNCE_EVERY_SECONDS = 0.05


@dataclass(frozen=True)
class Fleet:
    """This host in the fleet, and what it needs to take images from peers."""

    host: str
    url: str  # where this host's peer server is reached
    registry: PeerRegistry
    origin_locks: LockFactory  # fleet-wide, not waiting: one host fetches from the origin
    choice_locks: LockFactory  # fleet-wide, waiting: peer choices one at a time per image
    peers: PeerOptions
    poll_seconds: float = 0.02
    # how long a host waits for the holder of the origin lease to show its copy (lock.wait_seconds)
    wait_seconds: float = 900.0
    rng: random.Random = field(default_factory=random.Random)
    # held around each download from the origin (imgprep.precache: precache_concurrency slots)
    origin_gate: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext


def fetch_image(
    source: ImageSource,
    *,
    cache: ImageCache,
    options: FetchOptions,
    runner: Runner,
    locks: LockFactory,
    fleet: Fleet,
    progress: Progress = no_progress,
) -> CachedImage:
    """Make sure the image is in this host's cache, announce the complete copy to the fleet,
    and return its entry."""
    key = cache_key(source.image_id)
    entry = cache.entry(key)
    lease = locks(f"cache:{key}")

    def stage(part: Path) -> Staged[CachedImage]:
        transfer = Transfer(
            source, key, entry, part, lease.fence, cache, options, runner, fleet, progress
        )
        return transfer.run()

    image = publish_once(
        entry,
        find=lambda: find_cached(source, cache),
        lease=lease,
        stage=stage,
        with_record=True,
        extra_temporaries=(CONVERTED,),
    )
    announce_complete(key, cache, fleet)
    return image


def announce_complete(key: str, cache: ImageCache, fleet: Fleet) -> None:
    """Tell the fleet this host holds the complete entry `key` (after every fetch, so the
    registry follows the cache)."""
    record = cache.lookup(key)
    if record is None or record.file is None:
        return
    digests = fleet.registry.digests(key)
    if digests is None:  # forgotten (they expire): this host verified its entry, it vouches
        digests = ImageDigests(
            source_sha256=record.image.source_sha256, source_size=record.source_bytes
        )
    elif digests.source_sha256 != record.image.source_sha256:
        return  # another version of the image: this copy is not offered
    if digests.entry_sha256 is None:
        # the first host to publish it records the entry's digest: the source's, or, when it
        # converted the image, the digest of what it converted (its own, verified, bytes)
        converted = record.image.format != record.source_format
        digests = ImageDigests(
            source_sha256=digests.source_sha256,
            source_size=digests.source_size,
            entry_sha256=file_sha256(cache.entry(key)) if converted else digests.source_sha256,
            entry_size=record.file.size,
            entry_format=record.image.format,
            source_format=record.source_format,
        )
    fleet.registry.record_digests(key, digests)  # kept as long as copies are announced
    fleet.registry.announce(
        key,
        PeerCopy(
            host=fleet.host,
            url=fleet.url,
            content="entry",
            complete=True,
            size=record.file.size,
            total=record.file.size,
        ),
    )


def file_sha256(path: Path) -> str:
    with path.open("rb") as image:
        return hashlib.file_digest(image, "sha256").hexdigest()


def choose_peer(
    copies: Sequence[PeerCopy],
    *,
    me: str,
    have: Content | None,
    digests: ImageDigests | None,
    excluded: Callable[[str], bool],
    rng: random.Random,
) -> PeerCopy | None:
    """The copy to stream from: a complete one, the least loaded (at random among equals);
    else one in progress that does not stream from this host (directly or not), the least
    loaded, then the furthest along; None when there is none."""
    by_host = {copy.host: copy for copy in copies}
    load = Counter(copy.upstream for copy in copies if not copy.complete)
    usable = [
        copy
        for copy in copies
        if copy.host != me
        and not excluded(copy.host)
        and compatible(have, copy.content, digests)
        and (copy.content == "source" or digests is not None)
    ]
    complete = [copy for copy in usable if copy.complete]
    if complete:
        least = min(load[copy.host] for copy in complete)
        return rng.choice(sorted((c for c in complete if load[c.host] == least), key=_host))
    partial = [copy for copy in usable if not _streams_from(copy, me, by_host)]
    if not partial:
        return None
    return min(partial, key=lambda copy: (load[copy.host], -copy.size, copy.host))


def _host(copy: PeerCopy) -> str:
    return copy.host


def still_excluded(until: float, stalled_at: int | None, size: int | None, now: float) -> bool:
    """Whether a dropped peer is still not asked: until its cooldown ends, except a peer
    dropped for stalling whose recorded copy has grown since (a starved process, not a dead
    one): it is asked again at once, since its bytes spare the origin."""
    if until <= now:
        return False
    return not (stalled_at is not None and size is not None and size > stalled_at)


def _streams_from(copy: PeerCopy, me: str, by_host: dict[str, PeerCopy]) -> bool:
    """Whether `copy` gets its bytes from `me`, directly or through others."""
    seen = set()
    current: PeerCopy | None = copy
    while current is not None and not current.complete and current.host not in seen:
        if current.upstream == me:
            return True
        seen.add(current.host)
        current = by_host.get(current.upstream)
    return False


class _Restart(Exception):
    """The bytes so far cannot be used: start the transfer again from the first byte."""


class Transfer:
    """One host's staging of an image into its temporary `part`, from peers or the origin."""

    def __init__(  # noqa: PLR0917 - one transfer's whole context
        self,
        source: ImageSource,
        key: str,
        entry: Path,
        part: Path,
        fence: int,
        cache: ImageCache,
        options: FetchOptions,
        runner: Runner,
        fleet: Fleet,
        progress: Progress,
    ) -> None:
        self.source = source
        self.key = key
        self.entry = entry
        self.part = part
        self.fence = fence
        self.cache = cache
        self.options = options
        self.runner = runner
        self.fleet = fleet
        self.progress = progress
        self.registry = fleet.registry
        self.client = PeerClient(fleet.peers)
        # the sha256 the request names (hex), if any: no peer's record can vouch against it
        self.wanted = source.checksum.removeprefix("sha256:") if source.checksum else None
        self.excluded: dict[str, float] = {}  # host → until when (monotonic)
        self.stalled_at: dict[str, int] = {}  # host → its recorded size when it stalled
        self._announced = (0, 0.0)
        self._other_version_logged = False

    # -- the whole transfer ------------------------------------------------------------------

    def run(self) -> Staged[CachedImage]:
        try:
            for _ in range(WRONG_BYTES_ROUNDS):
                self.part.unlink(missing_ok=True)
                with ImageWriter(self.part, None) as writer:
                    try:
                        verified = self._receive(writer)
                    except _Restart:
                        continue
                return stage_entry(
                    self.part,
                    verified,
                    source=self.source,
                    entry=self.entry,
                    fence=self.fence,
                    cache=self.cache,
                    options=self.options,
                    runner=self.runner,
                    progress=self.progress,
                )
            raise SourceUnavailable(
                f"image {self.source.image_id}: peers served wrong bytes {WRONG_BYTES_ROUNDS} "
                "times; will retry"
            )
        except BaseException:
            try:
                self.registry.withdraw(self.key, self.fleet.host)
            except CoordinationUnavailable:  # the registry forgets it in time; the error matters
                log.warning("peer_copy_not_withdrawn")
            raise
        finally:
            self.client.close()

    def _receive(self, writer: ImageWriter) -> Verified:
        """Bytes into `writer` until they are complete and verified."""
        have: Content | None = None
        contributors: set[str] = set()
        waited_since: float | None = None
        while True:
            peer = self._choose(have, writer.size)
            if peer is not None:
                waited_since = None
                have = have or peer.content
                try:
                    self._stream(peer, writer, have)
                except PeerFailed as error:
                    self.excluded[peer.host] = time.monotonic() + error.cooldown
                    if error.stalled_at is None:
                        self.stalled_at.pop(peer.host, None)
                    else:
                        self.stalled_at[peer.host] = error.stalled_at
                    dropped = log.warning if error.cooldown == float("inf") else log.info
                    dropped("peer_dropped", peer=peer.host, at=writer.size, reason=str(error))
                    if error.gone and peer.complete:  # evicted there: nobody need ask again
                        self.registry.withdraw(self.key, peer.host)
                    continue
                finally:
                    if writer.size:
                        contributors.add(peer.host)
                return self._verify(writer, have, contributors)
            origin = self.fleet.origin_locks(f"origin:{self.key}")
            try:
                origin.__enter__()
            except LockBusy:
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > self.fleet.wait_seconds:
                    raise LockBusy(
                        f"image {self.source.image_id}: another host holds its origin lease and "
                        f"offered no copy for {self.fleet.wait_seconds:.0f} s; will retry"
                    ) from None
                time.sleep(self.fleet.poll_seconds * 5)  # the holder announces its copy soon
                continue
            try:
                # a copy may have become usable while the lease was someone else's (its holder
                # finished, or a peer dropped for stalling moved on): peers before the origin
                if self._candidate(have) is not None:
                    continue
                with self.fleet.origin_gate():
                    return self._from_origin(writer, have)
            finally:
                origin.__exit__(None, None, None)

    # -- peers -------------------------------------------------------------------------------

    def _digests(self) -> ImageDigests | None:
        """The fleet's digests of the image, unless the request's checksum names another
        version: then no digest vouches for anything, and only bytes that hash to the checksum
        itself are taken (a peer's copy of the source, else the origin's)."""
        digests = self.registry.digests(self.key)
        if digests is None or self.wanted is None or digests.source_sha256 == self.wanted:
            return digests
        if not self._other_version_logged:
            log.warning("peer_digests_of_another_version", recorded=digests.source_sha256)
            self._other_version_logged = True
        return None

    def _candidate(self, have: Content | None) -> PeerCopy | None:
        """The peer `choose_peer` picks now, among those not excluded (nothing is recorded)."""
        now = time.monotonic()
        copies = self.registry.copies(self.key)
        sizes = {copy.host: copy.size for copy in copies}
        return choose_peer(
            copies,
            me=self.fleet.host,
            have=have,
            digests=self._digests(),
            excluded=lambda host: still_excluded(
                self.excluded.get(host, 0.0), self.stalled_at.get(host), sizes.get(host), now
            ),
            rng=self.fleet.rng,
        )

    def _choose(self, have: Content | None, offset: int) -> PeerCopy | None:
        """A peer to stream from, recorded as this host's upstream before anyone else chooses."""
        with self.fleet.choice_locks(f"peers:{self.key}"):
            peer = self._candidate(have)
            if peer is not None:
                self._announce(have or peer.content, offset, peer.total, peer.host)
        return peer

    def _stream(self, peer: PeerCopy, writer: ImageWriter, have: Content) -> None:
        """Bytes from `peer` until this host has the whole image; PeerFailed when the peer
        stops giving them."""
        last_byte = time.monotonic()
        while True:
            current = self.registry.copy(self.key, peer.host)
            digests = self._digests()
            if current is None or not compatible(have, current.content, digests):
                raise PeerFailed(f"peer {peer.host} no longer offers the image", cooldown=0.5)
            if writer.size < current.size:
                end = min(current.size, writer.size + MAX_RANGE)
                for chunk in self.client.read(self.key, current, writer.size, end):
                    self._write(writer, chunk, current.total)
                last_byte = time.monotonic()
                continue
            if _all_there(current, writer.size, have, digests):
                return
            if writer.size > current.size and current.complete:
                raise PeerFailed(f"peer {peer.host} has fewer bytes than this host", cooldown=60)
            if time.monotonic() - last_byte > self.fleet.peers.stall_seconds:
                raise PeerFailed(
                    f"peer {peer.host} brought no byte for {self.fleet.peers.stall_seconds:g} s",
                    cooldown=self.fleet.peers.stall_seconds,
                    stalled_at=current.size,
                )
            time.sleep(self.fleet.poll_seconds)

    def _verify(self, writer: ImageWriter, have: Content, contributors: set[str]) -> Verified:
        """The bytes from peers, checked against the request's checksum, else the digest the
        fleet recorded (waited for a while: the host that downloads from the origin records it
        as soon as it has checked its bytes). A copy of a converted entry cannot be hashed to the
        request's checksum: it is checked against the entry digest a fleet host signed as the
        conversion of a source with that checksum (`_digests`)."""
        sha256 = writer.finish()
        needed = have == "entry" or self.wanted is None
        digests = self._wait_for_digests(writer.size) if needed else self._digests()
        if have == "source":
            expected = self.wanted or (digests.source_sha256 if digests is not None else None)
        else:  # a copy of a published entry: what its digests say, whose source is the request's
            expected = digests.entry_sha256 if digests is not None else None
        if expected is None:
            log.warning("peer_bytes_unverifiable", peers=sorted(contributors))
            raise _Restart()
        if sha256 != expected:
            self._distrust(contributors, sha256, expected)
            raise _Restart()
        assert digests is not None or have == "source"
        log.info("image_taken_from_peers", peers=sorted(contributors), bytes=writer.size)
        shown = f"peers {','.join(sorted(contributors))} (of {redact(self.source.url)})"
        if have == "source" or digests is None:
            return Verified(
                sha256=sha256,
                size=writer.size,
                declared_format=self.source.declared_format,
                shown_source=shown,
            )
        return Verified(
            sha256=sha256,
            size=writer.size,
            declared_format=digests.entry_format or "auto",
            shown_source=shown,
            source_sha256=digests.source_sha256,
            source_size=digests.source_size,
            source_format=digests.source_format,
        )

    def _wait_for_digests(self, size: int) -> ImageDigests | None:
        deadline = time.monotonic() + self.fleet.peers.stall_seconds
        while True:
            digests = self._digests()
            if digests is not None or time.monotonic() > deadline:
                return digests
            time.sleep(self.fleet.poll_seconds)

    def _distrust(self, contributors: set[str], sha256: str, expected: str) -> None:
        """Wrong bytes: every peer that sent some is dropped for the rest of this step; one
        that sent them all is withdrawn from the registry, so no host asks it again."""
        log.warning(
            "peer_bytes_wrong",
            peers=sorted(contributors),
            sha256=sha256,
            expected=expected,
        )
        for host in contributors:
            self.excluded[host] = float("inf")
        if len(contributors) == 1:
            self.registry.withdraw(self.key, next(iter(contributors)))

    # -- the origin --------------------------------------------------------------------------

    def _from_origin(self, writer: ImageWriter, have: Content | None) -> Verified:
        """Download from the origin, resuming after the bytes peers sent when a digest can
        vouch for them; record the source's digest for the fleet."""
        digests = self._digests()
        vouched = self.wanted is not None or digests is not None
        if writer.size and not (vouched and compatible(have, "source", digests)):
            raise _Restart()
        start = writer.size
        self._announce("source", start, None, ORIGIN)
        log.info("image_download_started", source=redact(self.source.url), start=start)
        fetched = download_into(
            self.source.url,
            writer,
            self.options.policy,
            lambda done, total: self._after_write(writer, total),
            start=start,
        )
        if start:
            expected = self.wanted or (digests.source_sha256 if digests is not None else None)
            if fetched.sha256 != expected:
                log.warning("resumed_download_wrong", start=start, sha256=fetched.sha256)
                raise _Restart()
        check_checksum(self.source, fetched.sha256)
        known = self.registry.digests(self.key)
        if known is None or known.source_sha256 != fetched.sha256:
            self.registry.record_digests(
                self.key, ImageDigests(source_sha256=fetched.sha256, source_size=fetched.size)
            )
        self.registry.progress(self.key, self.fleet.host, self.fence, fetched.size)
        return Verified(
            sha256=fetched.sha256,
            size=fetched.size,
            declared_format=self.source.declared_format,
            shown_source=redact(self.source.url),
        )

    # -- this host's own copy ----------------------------------------------------------------

    def _write(self, writer: ImageWriter, chunk: bytes, total: int | None) -> None:
        if writer.size + len(chunk) > self.options.policy.max_image_bytes:
            raise ChecksumMismatch(
                f"peers sent more than the allowed {self.options.policy.max_image_bytes} bytes"
            )
        writer.write(chunk)
        self._after_write(writer, total)

    def _after_write(self, writer: ImageWriter, total: int | None) -> None:
        """Report progress; tell the fleet how many bytes are on disk (throttled)."""
        self.progress(writer.size, total)
        size, when = self._announced
        now = time.monotonic()
        if writer.size - size >= ANNOUNCE_EVERY_BYTES or now - when >= ANNOUNCE_EVERY_SECONDS:
            self.registry.progress(self.key, self.fleet.host, self.fence, writer.size)
            self._announced = (writer.size, now)

    def _announce(self, content: Content, size: int, total: int | None, upstream: str) -> None:
        self.registry.announce(
            self.key,
            PeerCopy(
                host=self.fleet.host,
                url=self.fleet.url,
                content=content,
                complete=False,
                size=size,
                total=total,
                fence=self.fence,
                upstream=upstream,
            ),
        )
        self._announced = (size, time.monotonic())


def _all_there(copy: PeerCopy, size: int, have: Content, digests: ImageDigests | None) -> bool:
    """Whether `size` bytes are the whole image the copy will have."""
    if copy.complete:
        return size == copy.size
    if copy.total is not None:
        return size >= copy.total
    return have == "source" and digests is not None and digests.source_size == size
