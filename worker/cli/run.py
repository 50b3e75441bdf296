"""`imgprep worker`: a Celery worker with imgprep's queues and defaults."""

from __future__ import annotations

import click

from tasks.canvases import DEFAULT_QUEUE, host_queue
from worker.cli import main
from worker.settings import ensure_directories, get_settings


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a worker. Options such as --hostname and --concurrency go to `celery worker`.

    The worker consumes the shared queue `imgprep` and its host's queue
    `imgprep.host.<IMGPREP_HOST_ID>` unless -Q/--queues is given.
    """
    settings = get_settings()
    ensure_directories(settings)
    from worker.metrics_dir import use_metrics_dir

    use_metrics_dir(settings)  # before prometheus_client is imported: multiprocess mode
    from worker.app import app

    argv = ["worker", "--loglevel", settings.log_level, *celery_args]
    if not any(arg in ("-Q", "--queues") or arg.startswith("--queues=") for arg in celery_args):
        argv += ["--queues", f"{DEFAULT_QUEUE},{host_queue(settings.host_id)}"]
    app.worker_main(argv=argv)
