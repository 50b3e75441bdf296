"""`imgprep cache list` and `imgprep cache evict`: the shared image cache as operators see it."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import click

from worker.cli import EXIT_FAILED, SizeType, main, unprivileged
from worker.cli.sizes import human


@main.group()
@unprivileged
def cache() -> None:
    """Inspect the shared image cache and remove unused base images."""


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def list_entries(as_json: bool) -> None:
    """Every cached base: key, image id, format, size on disk, virtual size, references, last
    use. Reads the cache directory and the references in Redis."""
    from domain.cache.directory import ImageCache
    from domain.cache.inventory import read_entries
    from worker.settings import get_settings
    from worker.stores.redis_connect import redis_client
    from worker.stores.redis_references import RedisReferences

    settings = get_settings()
    client = redis_client(settings.coordination, settings.redis)
    # the references are Redis's: an empty cache directory beside a Redis that does not answer
    # is not an empty cache (entries of other hosts, downloads in progress), so ask it first
    client.ping()
    references = RedisReferences(client, settings.cache_namespace)
    rows = [
        {
            "key": entry.key,
            "image_id": entry.image_id,
            "format": entry.record.image.format if entry.record else None,
            "size_on_disk": entry.size_on_disk,
            "virtual_size": entry.record.image.virtual_size if entry.record else None,
            "references": len(entry.holders),
            "holders": sorted(entry.holders),
            "last_used": datetime.fromtimestamp(entry.last_used, UTC).isoformat(),
        }
        for entry in read_entries(ImageCache(settings.cache_dir), references)
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(render_entries(rows))


def render_entries(rows: list[dict[str, Any]]) -> str:
    header = f"{'KEY':<40}  {'IMAGE ID':<24}  {'FORMAT':<6}  {'ON DISK':>9}  {'VIRTUAL':>9}  "
    lines = [header + f"{'REFS':>4}  LAST USE"]
    for row in rows:
        virtual = human(row["virtual_size"]) if row["virtual_size"] is not None else "-"
        lines.append(
            f"{row['key']:<40}  {(row['image_id'] or '(orphaned)')[:24]:<24}  "
            f"{row['format'] or '-':<6}  {human(row['size_on_disk']):>9}  {virtual:>9}  "
            f"{row['references']:>4}  {row['last_used'][:19].replace('T', ' ')}"
        )
    if not rows:
        lines.append("(the cache is empty)")
    return "\n".join(lines)


@cache.command("evict")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@click.option(
    "--older-than",
    type=float,
    default=None,
    help="Seconds unused before a base goes (default: the workers' setting).",
)
@click.option("--max-bytes", type=SizeType(), default=None, help="Size cap for this pass.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evict(
    dry_run: bool, older_than: float | None, max_bytes: int | None, timeout: float, as_json: bool
) -> None:
    """Run the cache manager now (imgprep.evict_cache on a worker) and print its report."""
    from domain.core.models import CacheEvictionReport, EvictCacheRequest
    from worker.cli.client import Client

    request = EvictCacheRequest(
        dry_run=dry_run,
        remove_unused_original_minimum_age_seconds=older_than,
        max_bytes=max_bytes,
    )
    result = Client().send("imgprep.evict_cache", request.model_dump(mode="json"))
    try:
        report = CacheEvictionReport.model_validate(result.get(timeout=timeout))
    except Exception as error:
        click.echo(f"imgprep: cache evict failed: {type(error).__name__}: {error}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    verb = "would remove" if report.dry_run else "removed"
    for item in report.evicted:
        click.echo(
            f"{verb} {item.key} ({item.image_id or 'orphaned'}, {human(item.size_on_disk)}, "
            f"{item.reason})"
        )
    click.echo(
        f"{len(report.evicted)} {verb}, {len(report.kept_in_use)} in use, "
        f"{len(report.skipped_busy)} busy; cache {human(report.bytes_before)} -> "
        f"{human(report.bytes_after)} (worker host {report.host})"
    )
