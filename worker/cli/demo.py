"""`imgprep demo`: the end-to-end job on one machine (worker.demo)."""

from __future__ import annotations

import sys

import click

from worker.cli import main


@main.command()
@click.option("--keep-worker", is_flag=True, help="Leave the demo's worker running.")
def demo(keep_worker: bool) -> None:
    """Prepare two instance disks from a generated image served over HTTP, end to end."""
    from worker.demo import run_demo

    sys.exit(run_demo(keep_worker=keep_worker))
