"""`imgprep status`: an operation's state and its canvas as a tree of steps."""

from __future__ import annotations

import sys

import click

from worker.cli import EXIT_FAILED, main, unprivileged
from worker.cli.operation_state import OperationStatus


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@unprivileged
def status(task_id: str, as_json: bool) -> None:
    """Show an operation's state and each step of its canvas."""
    from worker.app import app
    from worker.app.signals import journal
    from worker.cli.operation_state import read_status

    view = read_status(app, journal(), task_id)
    if as_json:
        click.echo(view.model_dump_json(indent=2))
    else:
        click.echo(render_status(view))
    if view.state == "FAILURE":
        sys.exit(EXIT_FAILED)


def render_status(view: OperationStatus) -> str:
    """The operation as a tree of steps with states and durations."""
    lines = [f"{view.task_id}  {view.state}"]
    if view.error:
        lines.append(f"  error: {view.error_type}: {view.error}")
    for index, step in enumerate(view.steps):
        branch = "└─" if index == len(view.steps) - 1 else "├─"
        seconds = f"{step.seconds:8.3f} s" if step.seconds is not None else " " * 10
        extra = []
        if step.attempts > 1:
            extra.append(f"{step.attempts} attempts")
        if step.progress and step.progress.get("percent") is not None:
            extra.append(f"{step.progress['percent']}%")
        if step.error:
            extra.append(step.error)
        lines.append(
            f"{branch} {step.name:<16} {step.state:<8} {seconds}  {'; '.join(extra)}".rstrip()
        )
    if not view.steps and view.state == "PENDING":
        lines.append("  (no such operation, or not started yet)")
    return "\n".join(lines)
