"""Images imported once per Ceph cluster: `<images_pool>/<key>@snap`, the parent of every clone.

The publish-once shape (domain.core.publish) on RBD, under a lease of the whole cluster,
`rbd:<fsid>/<images_pool>/<key>`, that every worker of every host using the cluster shares:

    find it → return it | take the lease → remove every holder's temporaries → find it again →
    fetch a verified local copy (the host's cache entry, or a download with today's checks:
    checksum, inspection, limits) → qemu-img convert it to raw into `<key>.part.<fence>` →
    record → snapshot `snap` → protect it → fence check → rename into `<key>`

The final name always holds a complete image with its protected snapshot: an rbd rename never
replaces an image, and the snapshot is made before the rename. A worker killed at any point
leaves a temporary (removed by the next holder, which finds it in the Temporaries record made
before it was created) or a complete image; a holder paused past its lease fails at the rename
(the name is taken, or its temporary is gone) with LockLost. Nothing can clone a temporary:
clones are made only from final names.

A request whose source is already an RBD snapshot of this cluster (Glance's `rbd://` location,
Nova's `Rbd.clone`) is not downloaded: the snapshot is checked (this cluster's fsid, raw bytes,
protected) and cloned as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from domain.cache.directory import ImageCache, cache_key, find_cached
from domain.cache.download import download
from domain.cache.staging import FetchOptions, Verified, check_checksum, inspect_verified
from domain.core.errors import (
    CephConfigInvalid,
    ChecksumMismatch,
    DiskConflict,
    ImageRefused,
    LockLost,
    RbdSourceRefused,
)
from domain.core.fileops import remove_files
from domain.core.models import CachedImage, ImageSource
from domain.core.ports import Lease, LockFactory, Progress, no_progress
from domain.core.publish import lost_or
from domain.core.urls import redact
from domain.formats.inspection import inspect_image
from domain.rbd import names, tool
from domain.rbd.ports import ImportedImages, Temporaries
from domain.rbd.tool import RbdExists, RbdTool

log = structlog.get_logger(__name__)

RECORD_KEY = "imgprep.record"  # the image's record, an image-meta key (JSON)
HEADER_BYTES = 1 << 20  # what is read of an rbd:// source to see that it is raw


@dataclass(frozen=True)
class RbdContext:
    """A host's way to its cluster and what it works with there."""

    tool: RbdTool
    cluster_locks: LockFactory  # leases of the whole fleet (no host namespace), that wait
    temporaries: Temporaries
    imported: ImportedImages  # records of imported images and their last use, for aging
    staging_dir: Path  # downloads before import, `<state_dir>/rbd-imports`
    cache: ImageCache  # a local cache entry of the image is imported as it is, not downloaded
    options: FetchOptions

    def lease(self, pool: str, image: str) -> Lease:
        """The cluster-wide lease of one image name."""
        return self.cluster_locks(f"rbd:{self.tool.fsid()}/{pool}/{image}")

    def resource(self, pool: str, image: str) -> str:
        return f"{self.tool.fsid()}/{pool}/{image}"


def import_to_rbd(
    source: ImageSource,
    ctx: RbdContext,
    progress: Progress = no_progress,
    downloaded: Progress | None = None,
) -> CachedImage:
    """The image of `source` in the cluster, imported if it is not there yet; its `path` is the
    protected snapshot's rbd:// location. `progress` hears the import, `downloaded` (default:
    `progress`) the download."""
    if names.parse_location(source.url) is not None:
        return rbd_source(source, ctx)
    pool, name = ctx.tool.access.images_pool, names.image_name(source.image_id)
    structlog.contextvars.bind_contextvars(image_key=name)
    found = find_imported(source, ctx)
    if found is not None:
        ctx.imported.touch(ctx.resource(pool, name))
        return found
    lease = ctx.lease(pool, name)
    with lease:
        remove_temporaries(ctx, pool, name)
        found = find_imported(source, ctx, ask_cluster=True)
        if found is not None:
            ctx.imported.touch(ctx.resource(pool, name))
            return found
        ctx.imported.touch(
            ctx.resource(pool, name)
        )  # before it appears: aging never sees it unused
        part = names.temporary(name, lease.fence)
        ctx.temporaries.add(ctx.resource(pool, name), part)
        try:
            imported = _import(
                source,
                ctx,
                part=part,
                lease=lease,
                progress=progress,
                downloaded=downloaded or progress,
            )
        except Exception as error:
            abandon(ctx, pool, name, part)
            raise lost_or(error, lease) from error
        ctx.temporaries.discard(ctx.resource(pool, name), part)
        return imported


def find_imported(
    source: ImageSource, ctx: RbdContext, *, ask_cluster: bool = False
) -> CachedImage | None:
    """The imported image of `source` if it is complete (its snapshot protected: the last thing
    done before the rename); ChecksumMismatch when it was imported from other bytes.

    Its record in ImportedImages answers without asking the cluster (the clone step imports it
    again if the image turns out gone); `ask_cluster` (under the lease) asks the cluster itself:
    a snapshot listing and the image-meta record, about 50 ms each.

    ImportedImages is in Redis, which more hosts write to than hold the cluster's key: its
    record says where the image is and how large, never which bytes it holds. A request with a
    checksum is checked against the image-meta record the importer wrote in the cluster
    (one call), so a record rewritten in Redis cannot make an image of other bytes pass."""
    pool, name = ctx.tool.access.images_pool, names.image_name(source.image_id)
    resource = ctx.resource(pool, name)
    remembered = None if ask_cluster else ctx.imported.recall(resource)
    if remembered is not None:
        record = _parsed(remembered)
        size = record.get("virtual_size")
        if isinstance(size, int) and source.checksum is None:
            return _checked(source, ctx, pool, name, record=record, size=size)
        if isinstance(size, int):
            written = read_record(ctx.tool, pool, name)  # the cluster's own, for the checksum
            if written:
                record = {**written, "virtual_size": size}
                return _checked(source, ctx, pool, name, record=record, size=size)
    snapshots = tool.snapshots(ctx.tool, pool, name)
    if snapshots is None:
        if remembered is not None:
            ctx.imported.forget(resource)
        return None
    snapshot = next((s for s in snapshots if s.name == names.SNAPSHOT and s.protected), None)
    if snapshot is None:
        raise DiskConflict(
            f"{pool}/{name} exists without a protected snapshot {names.SNAPSHOT!r}: it is not an "
            f"image imgprep imported for {source.image_id}; remove it to import the image"
        )
    record = {**read_record(ctx.tool, pool, name), "virtual_size": snapshot.size}
    ctx.imported.remember(resource, json.dumps(record, sort_keys=True))
    return _checked(source, ctx, pool, name, record=record, size=snapshot.size)


def _checked(
    source: ImageSource,
    ctx: RbdContext,
    pool: str,
    name: str,
    *,
    record: dict[str, object],
    size: int,
) -> CachedImage:
    sha256 = str(record.get("source_sha256") or "")
    if source.checksum is not None and source.checksum != f"sha256:{sha256}":
        raise ChecksumMismatch(
            f"image {source.image_id} was imported into {pool}/{name} from bytes with "
            f"sha256:{sha256 or 'unknown'}, the request expected {source.checksum}"
        )
    return _cached(ctx, source, pool, name, size=size, sha256=sha256)


def _parsed(text: str) -> dict[str, object]:
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def read_record(rbd: RbdTool, pool: str, name: str) -> dict[str, object]:
    """The image's record as its image-meta holds it ({} when it has none)."""
    text = tool.metadata_get(rbd, pool, name, RECORD_KEY)
    return _parsed(text) if text else {}


def _import(
    source: ImageSource,
    ctx: RbdContext,
    *,
    part: str,
    lease: Lease,
    progress: Progress,
    downloaded: Progress,
) -> CachedImage:
    pool, name = ctx.tool.access.images_pool, names.image_name(source.image_id)
    with verified_copy(source, ctx, lease.fence, downloaded) as (local, verified, fmt, size):
        log.info("rbd_import_started", image=f"{pool}/{part}", format=fmt, virtual_size=size)
        ctx.tool.stream(
            [
                "qemu-img",
                "convert",
                "-p",
                "-f",
                fmt,
                "-O",
                "raw",
                "-t",
                "none",
                str(local),
                ctx.tool.access.qemu_filename(pool, part),
            ],
            on_line=lambda line: _progress(line, size, progress),
            what=f"import of {source.image_id} into {pool}",
            timeout=ctx.tool.access.transfer_timeout_seconds,
        )
    record = {
        "image_id": source.image_id,
        "source": verified.shown_source,
        "source_sha256": verified.source_sha256 or verified.sha256,
        "source_format": fmt,
        "fence": lease.fence,
        "imported_at": datetime.now(UTC).isoformat(),
    }
    publish_image(ctx, pool, part, name, record=record, lease=lease, doing="importing")
    ctx.imported.remember(
        ctx.resource(pool, name), json.dumps({**record, "virtual_size": size}, sort_keys=True)
    )
    log.info("rbd_image_imported", image=f"{pool}/{name}", virtual_size=size)
    return _cached(ctx, source, pool, name, size=size, sha256=str(record["source_sha256"]))


def _cached(
    ctx: RbdContext, source: ImageSource, pool: str, name: str, *, size: int, sha256: str
) -> CachedImage:
    """The imported image `pool/name` as the disk step takes it: raw, at its rbd:// location."""
    return CachedImage(
        key=name,
        image_id=source.image_id,
        path=names.location(ctx.tool.fsid(), pool, name),
        format="raw",
        virtual_size=size,
        source_sha256=sha256,
    )


def publish_image(
    ctx: RbdContext,
    pool: str,
    part: str,
    name: str,
    *,
    record: dict[str, object],
    lease: Lease,
    doing: str,
) -> None:
    """Give the complete image `part` its record and its protected snapshot, then rename it to
    `name` while `lease` is held (the fence before the commit); LockLost when `name` appeared in
    the meantime (what this holder was `doing` is then discarded)."""
    tool.metadata_set(ctx.tool, pool, part, RECORD_KEY, json.dumps(record, sort_keys=True))
    tool.snap_create(ctx.tool, pool, part, names.SNAPSHOT)
    tool.snap_protect(ctx.tool, pool, part, names.SNAPSHOT)
    lease.ensure_held()
    try:
        tool.rename(ctx.tool, pool, part, name)
    except RbdExists:
        raise LockLost(
            f"{pool}/{name} appeared while this worker was {doing} it: another holder's lease "
            "overlapped this one's; this worker's copy is discarded"
        ) from None


@contextmanager
def verified_copy(
    source: ImageSource, ctx: RbdContext, fence: int, progress: Progress
) -> Iterator[tuple[Path, Verified, str, int]]:
    """A local copy of the image that passed today's checks, its format and virtual size: the
    host's cache entry when it has one, else a download into the staging directory (removed
    when the block ends)."""
    cached = find_cached(source, ctx.cache)
    if cached is not None:
        verified = Verified(
            sha256=cached.source_sha256,
            size=0,
            declared_format=cached.format,
            shown_source=f"cache entry {cached.key}",
        )
        yield Path(cached.path), verified, cached.format, cached.virtual_size
        return
    ctx.staging_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(source.image_id)
    part = ctx.staging_dir / names.temporary(key, fence)
    remove_files(sorted(ctx.staging_dir.glob(f"{key}.part.*")))
    try:
        log.info("image_download_started", source=redact(source.url))
        fetched = download(source.url, part, ctx.options.policy, progress)
        check_checksum(source, fetched.sha256)
        verified = Verified(
            sha256=fetched.sha256,
            size=fetched.size,
            declared_format=source.declared_format,
            shown_source=redact(source.url),
        )
        inspected, info = inspect_verified(part, source, verified, ctx.options, ctx.tool.runner)
        yield part, verified, inspected.format, info.virtual_size
    finally:
        remove_files([part])


def _progress(line: str, total: int, progress: Progress) -> None:
    from domain.formats.qemu_img import PROGRESS

    match = PROGRESS.search(line)
    if match:
        progress(int(total * float(match.group(1)) / 100), total)


def remove_temporaries(ctx: RbdContext, pool: str, name: str) -> list[str]:
    """Under the lease: remove every holder's temporaries of `name` recorded in Temporaries
    (an image a dead client still watches takes up to 30 s to go)."""
    resource = ctx.resource(pool, name)
    removed = []
    for part in ctx.temporaries.members(resource):
        if names.temporaries_of(name, [part]):
            remove_image(ctx.tool, pool, part)
            removed.append(part)
        ctx.temporaries.discard(resource, part)
    if removed:
        log.info("stale_temporaries_removed", image=f"{pool}/{name}", removed=removed)
    return removed


def abandon(ctx: RbdContext, pool: str, name: str, part: str) -> None:
    """After a failure: remove this holder's temporary and its record; when the cluster cannot
    be asked now, both stay for the next holder. With settings that cannot reach the pool at
    all (CephConfigInvalid: no pool, no key) nothing was made, and the record goes too."""
    try:
        remove_image(ctx.tool, pool, part)
    except CephConfigInvalid:
        pass
    except Exception as error:
        log.warning("rbd_cleanup_failed", image=f"{pool}/{part}", error=str(error))
        return
    ctx.temporaries.discard(ctx.resource(pool, name), part)


def remove_image(rbd: RbdTool, pool: str, name: str, *, quiet: bool = False) -> bool:
    """Remove an image and its snapshots (unprotecting them); False when it was not there.
    `quiet`: a failure is logged, not raised (cleanup after another error)."""
    try:
        snapshots = tool.snapshots(rbd, pool, name)
        if snapshots is None:
            return False
        for snapshot in snapshots:
            if snapshot.protected:
                tool.snap_unprotect(rbd, pool, name, snapshot.name)
            tool.snap_remove(rbd, pool, name, snapshot.name)
        return tool.remove(rbd, pool, name)
    except Exception as error:
        if not quiet:
            raise
        log.warning("rbd_cleanup_failed", image=f"{pool}/{name}", error=str(error))
        return False


def rbd_source(source: ImageSource, ctx: RbdContext) -> CachedImage:
    """An `rbd://fsid/pool/image/snap` source: cloned as it is, once it is known to be a
    protected snapshot of raw bytes in this host's cluster."""
    parsed = names.parse_location(source.url)
    assert parsed is not None
    fsid, pool, image, snap = parsed
    ours = ctx.tool.fsid()
    if fsid != ours.lower():
        raise RbdSourceRefused(
            f"{source.url} is in cluster {fsid}; this host's cluster (rbd.conf) is {ours}: "
            "give the image's http(s) URL instead, to import it here"
        )
    if source.declared_format not in ("auto", "raw"):
        raise RbdSourceRefused(
            f"{source.url} is declared {source.declared_format}: clones need raw"
        )
    snapshots = tool.snapshots(ctx.tool, pool, image)
    found = next((s for s in snapshots or [] if s.name == snap), None)
    if found is None:
        raise RbdSourceRefused(f"{source.url}: no snapshot {snap} of {pool}/{image} in the cluster")
    if not found.protected:
        raise RbdSourceRefused(
            f"{source.url}: the snapshot is not protected, so it cannot be cloned"
        )
    check_raw(ctx, pool, image, snap, source.url)
    return CachedImage(
        key=cache_key(source.image_id),
        image_id=source.image_id,
        path=source.url,
        format="raw",
        virtual_size=found.size,
        source_sha256="",
    )


def check_raw(ctx: RbdContext, pool: str, image: str, snap: str, shown: str) -> None:
    """RbdSourceRefused unless the snapshot's first bytes are raw data (no image header: a
    qcow2 stored in RBD would be cloned as a raw disk holding a qcow2 file)."""
    ctx.staging_dir.mkdir(parents=True, exist_ok=True)
    header = ctx.staging_dir / f"{cache_key(shown)}.header"
    try:
        ctx.tool.stream(
            [
                "qemu-img",
                "dd",
                "-f",
                "raw",
                "-O",
                "raw",
                f"bs={HEADER_BYTES}",
                "count=1",
                f"if={ctx.tool.access.qemu_filename(pool, image, snap)}",
                f"of={header}",
            ],
            on_line=lambda line: None,
            what=f"reading the header of {shown}",
            timeout=ctx.tool.access.command_timeout_seconds,
        )
        inspect_image(header, "raw")
    except ImageRefused as error:
        raise RbdSourceRefused(f"{shown} is not raw: {error}") from None
    finally:
        remove_files([header])
