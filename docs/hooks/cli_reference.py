"""The command reference (docs/operating.md): each `imgprep` command's own --help, rendered at
build time from the click group, so the page says what the command accepts today.

The one import of the command group is below: if the module moves, change it there.
"""

from __future__ import annotations

from pathlib import Path

import click

from worker.cli import main as imgprep

ROOT = Path(__file__).resolve().parents[2]


def commands(group: click.Group = imgprep, prefix: str = "imgprep") -> list[tuple[str, str]]:
    """Every command and subcommand, each with its help as `--help` prints it."""
    found: list[tuple[str, str]] = []
    parent = click.Context(group, info_name=prefix, **group.context_settings)
    for name in group.list_commands(parent):
        command = group.get_command(parent, name)
        if command is None or command.hidden:
            continue
        context = click.Context(command, info_name=name, parent=parent)
        # a default that names this checkout (schemas --output) reads as the checkout's path
        text = command.get_help(context).replace(str(ROOT), "<checkout>")
        found.append((f"{prefix} {name}", text))
        if isinstance(command, click.Group):
            found.extend(commands(command, f"{prefix} {name}"))
    return found


def render(group: click.Group = imgprep) -> str:
    """One section per command: its name as the heading, its help as text."""
    lines: list[str] = []
    for name, text in commands(group):
        lines += [f"### `{name}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(lines)
