"""The `imgprep` command: run a worker, enqueue and follow operations, run the demo.

The group and its shared pieces live here; each command lives in its own module of this
package and registers itself on `main` when imported (the imports at the bottom).
"""

from __future__ import annotations

from typing import Any

import click

from worker.logs import configure_logging
from worker.settings import get_settings
from worker.sizes import parse_size

EXIT_FAILED = 1
EXIT_USAGE = 2


class SizeType(click.ParamType[int]):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imgprep")
def main() -> None:
    """imgprep: prepare virtual-machine disks with a fleet of Celery workers."""
    # Commands print for people; their logs are warnings and errors only. `worker` logs at
    # IMGPREP_LOG_LEVEL: Celery's setup_logging signal reconfigures it.
    configure_logging(level="WARNING", log_format=get_settings().log_format)


# Commands register themselves on `main` when their module is imported.
from worker.cli import (  # noqa: E402, F401
    beat,
    cache,
    demo,
    flower,
    helper,
    inspect,
    precache,
    prepare,
    run,
    schemas,
    snapshot,
    status,
)
