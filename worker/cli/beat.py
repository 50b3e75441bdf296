"""`imgprep beat`: Celery beat sending imgprep's periodic tasks (the image cache manager)."""

from __future__ import annotations

import click

from worker.cli import main, unprivileged
from worker.settings import ensure_directories, get_settings


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@unprivileged
def beat(celery_args: tuple[str, ...]) -> None:
    """Run Celery beat: it sends imgprep.evict_cache every
    image_cache.manager_interval_seconds. Run one per cluster. Options go to `celery beat`."""
    settings = get_settings()
    ensure_directories(settings)
    from worker.app import app

    argv = ["beat", "--loglevel", settings.log_level]
    if not any(arg in ("-s", "--schedule") or arg.startswith("--schedule=") for arg in celery_args):
        argv += ["--schedule", str(settings.state_dir / "celerybeat-schedule")]
    app.start(argv=[*argv, *celery_args])
