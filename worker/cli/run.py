"""`imgprep worker`: a Celery worker with imgprep's queues and defaults."""

from __future__ import annotations

import os

import click

from worker.app.routing import DEFAULT_QUEUE, host_queue
from worker.cli import main
from worker.settings import ensure_directories, get_settings


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a worker. Options such as --hostname and --concurrency go to `celery worker`.

    The worker consumes the shared queue `imgprep` and its host's queue
    `imgprep.host.<IMGPREP_HOST_ID>` unless -Q/--queues is given, with two pool processes per
    CPU unless -c/--concurrency is given: steps mostly wait on disks, the network, Redis and
    qemu-img, so one process per CPU leaves the CPUs idle (measured in bench/cache_hit.py).
    """
    settings = get_settings()
    ensure_directories(settings)
    from worker.privileges.separation import separate

    helper = separate(settings)  # the helper as root, then the workers' user (privileges.*)
    from worker.metrics_dir import use_metrics_dir

    use_metrics_dir(settings)  # before prometheus_client is imported: multiprocess mode
    from worker.app import app

    argv = ["worker", "--loglevel", settings.log_level, *celery_args]
    if not _given(celery_args, "-Q", "--queues"):
        argv += ["--queues", f"{DEFAULT_QUEUE},{host_queue(settings.host_id)}"]
    if not _given(celery_args, "-c", "--concurrency"):
        argv += ["--concurrency", str(2 * (os.cpu_count() or 1))]
    # Celery's command line in standalone mode, as `celery worker` runs: app.worker_main (and
    # app.start) drop the worker's exit status, so a worker that stopped on an unrecoverable
    # error would exit 0, which a supervisor that restarts on failure takes for a clean stop
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app  # --app: this one (what app.start does)
    try:
        celery_command.main(args=argv, prog_name="imgprep")
    except SystemExit as done:
        if helper is not None and helper.exited:  # a failure, so the supervisor restarts it
            raise SystemExit(EXIT_HELPER_EXITED) from None
        raise done


EXIT_HELPER_EXITED = 3


def _given(args: tuple[str, ...], short: str, long: str) -> bool:
    return any(arg in (short, long) or arg.startswith(f"{long}=") for arg in args)
