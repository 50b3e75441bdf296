"""`imgprep helper`: run the privileged helper as a service of its own (systemd, compose)."""

from __future__ import annotations

import os
import sys

import click

from worker.cli import main
from worker.settings import get_settings


@main.command()
def helper() -> None:
    """Run the privileged helper (as root) on privileges.helper_socket, serving the workers'
    user privileges.user, with the roots of these settings. Workers then run with
    IMGPREP_PRIVILEGES__START_HELPER=false."""
    settings = get_settings()
    if not settings.privileges.helper_socket:
        raise click.UsageError("set IMGPREP_PRIVILEGES__HELPER_SOCKET to run the helper")
    from worker.privileges.separation import helper_argv

    argv = helper_argv(settings)
    sys.stdout.flush()
    os.execv(argv[0], argv)  # noqa: S606 - our own interpreter, with our own arguments
