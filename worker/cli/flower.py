"""`imgprep flower`: Flower on imgprep's broker, with our app and a tasks page that shows progress.

Flower learns about tasks from events only. Every imgprep message carries JSON arguments without
secrets (argsrepr), and steps send a `task-progress` event that Flower shows as the state
PROGRESS with the progress as the result; the default columns show both. Its HTTP API answers
with auth configured (--basic-auth, --auth) or with FLOWER_UNAUTHENTICATED_API=true.
"""

from __future__ import annotations

import sys

import click

from worker.cli import main, unprivileged

TASKS_COLUMNS = "name,state,result,args,runtime,retries,worker,received,uuid"


def flower_argv(flower_args: tuple[str, ...]) -> list[str]:
    """`celery flower` arguments: our defaults first, so that the operator's options win."""
    argv = ["flower", f"--tasks_columns={TASKS_COLUMNS}"]
    return [*argv, *flower_args]


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@unprivileged
def flower(flower_args: tuple[str, ...]) -> None:
    """Run Flower on imgprep's broker. Options such as --port, --address, --basic-auth go to
    Flower; FLOWER_* environment variables work as documented by Flower."""
    from worker.app import app

    sys.exit(app.start(argv=flower_argv(flower_args)) or 0)
