"""Following an operation while it runs: a live progress bar per step on a terminal (rich), one
line per change otherwise. Both go to stderr, so stdout keeps only the result.

The view is `worker.cli.operation_state.read_status` polled a few times a second: the journal's plan
gives the steps, the result backend their states and PROGRESS meta (bytes done and total).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Literal

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from worker.cli.operation_state import OperationStatus, StepStatus
from worker.cli.sizes import human

Mode = Literal["bars", "lines", "quiet"]
POLL_SECONDS = 0.25


def choose_mode(quiet: bool, stream: IO[str] | None = None) -> Mode:
    if quiet:
        return "quiet"
    return "bars" if (stream or sys.stderr).isatty() else "lines"


def watch(
    read: Callable[[], OperationStatus], *, mode: Mode, timeout: float
) -> OperationStatus | None:
    """Show the operation until it is over or `timeout` passes; its last view (None: quiet)."""
    if mode == "quiet":
        return None
    deadline = time.monotonic() + timeout
    show = _Bars() if mode == "bars" else _Lines()
    try:
        while True:
            view = read()
            show.update(view)
            if view.ready or time.monotonic() > deadline:
                return view
            time.sleep(POLL_SECONDS)
    finally:
        show.close()


def follow(task_id: str, *, as_json: bool, timeout: float) -> None:
    """What `imgprep prepare --wait` shows while the operation runs (nothing with --json)."""
    from worker.app import app
    from worker.app.signals import journal
    from worker.cli.operation_state import read_status

    watch(lambda: read_status(app, journal(), task_id), mode=choose_mode(as_json), timeout=timeout)


def step_line(step: StepStatus) -> str:
    """`fetch_to_cache    PROGRESS  42.0%  6.0 MiB of 12.0 MiB` and the like."""
    parts = [f"{step.name:<18}", f"{step.state:<8}"]
    progress = step.progress or {}
    if progress.get("percent") is not None:
        parts.append(f"{progress['percent']:5.1f}%")
    if progress.get("done") is not None:
        total = progress.get("total")
        parts.append(human(int(progress["done"])) + (f" of {human(int(total))}" if total else ""))
    if step.seconds is not None:
        parts.append(f"{step.seconds:.2f} s")
    if step.attempts > 1:
        parts.append(f"attempt {step.attempts}")
    if step.error:
        parts.append(step.error)
    return "  ".join(parts).rstrip()


class _Lines:
    """One line on stderr whenever a step's state changes or its progress moves by 10%."""

    def __init__(self) -> None:
        self._shown: dict[str, tuple[str, int]] = {}

    def update(self, view: OperationStatus) -> None:
        for step in view.steps:
            percent = (step.progress or {}).get("percent")
            bucket = int(percent // 10) if percent is not None else -1
            if self._shown.get(step.task_id) != (step.state, bucket):
                self._shown[step.task_id] = (step.state, bucket)
                click.echo(step_line(step), err=True)

    def close(self) -> None:
        return


class _Bars:
    """A rich progress bar per step, live on the terminal."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            TextColumn("{task.fields[state]:<8}"),
            DownloadColumn(binary_units=True),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.rows: dict[str, TaskID] = {}
        self.progress.start()

    def update(self, view: OperationStatus) -> None:
        for step in view.steps:
            row = self.rows.get(step.task_id)
            if row is None:
                row = self.progress.add_task(step.name, total=None, state=step.state, start=False)
                self.rows[step.task_id] = row
            progress = step.progress or {}
            total = progress.get("total")
            done = progress.get("done")
            if step.state != "PENDING":
                self.progress.start_task(row)
            if step.state == "SUCCESS":
                final = self.progress.tasks[self.rows[step.task_id]].total or 1
                self.progress.update(row, total=final, completed=final, state=step.state)
            else:
                self.progress.update(row, total=total, completed=done or 0, state=step.state)

    def close(self) -> None:
        self.progress.stop()
