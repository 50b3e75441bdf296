"""The `imgprep` command: run a worker, enqueue and follow operations, run the demo.

The group and its shared pieces live here; each command lives in its own module of this
package and registers itself on `main` when imported (the imports at the bottom).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

if TYPE_CHECKING:
    from pydantic import BaseModel

from worker.cli.sizes import parse_size
from worker.logs import configure_logging
from worker.settings import get_settings

EXIT_FAILED = 1
EXIT_USAGE = 2

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound="BaseModel")


def unprivileged(command: Callable[P, R]) -> Callable[P, R]:
    """Run `command` as `privileges.user` when it is started as root with that set (README,
    "Privileges"): beat, Flower and the commands that talk to Redis or parse images need no
    privilege. Click has converted the arguments first, as the caller: files the caller names to
    inject are read with the caller's rights; what runs after does not keep them. `worker`,
    `demo` and `helper` separate themselves; `schemas` writes the checkout's files."""

    @functools.wraps(command)
    def as_user(*args: P.args, **kwargs: P.kwargs) -> R:
        from worker.privileges.separation import leave_root

        leave_root(get_settings())
        return command(*args, **kwargs)

    return as_user


def request_or_exit(model: type[M], payload: dict[str, Any]) -> M:
    """`payload` as the wire model `model`; a request that does not validate exits with one line
    naming the field (EXIT_USAGE), as a worker would refuse it."""
    from pydantic import ValidationError

    from worker.app.taskbase import describe_validation

    try:
        return model.model_validate(payload)
    except ValidationError as error:
        click.echo(f"imgprep: {describe_validation(error)}", err=True)
        raise SystemExit(EXIT_USAGE) from None


class SizeType(click.ParamType[int]):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


class ImgprepGroup(click.Group):
    """The command group; a Redis that stays unreachable is one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as error:
            cause = _redis_unreachable(error)
            if cause is None:
                raise
            from worker.stores.redis_urls import display

            settings = get_settings()
            click.echo(
                f"imgprep: Redis did not answer ({display(settings.redis_url)}; waited about "
                f"{settings.redis_outage_seconds:.0f} s): {cause}",
                err=True,
            )
            ctx.exit(EXIT_FAILED)


def _redis_unreachable(error: BaseException) -> BaseException | None:
    """The connection error behind `error` (Celery and kombu wrap redis-py's), if there is one."""
    import kombu.exceptions
    import redis.exceptions

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(
            seen,
            redis.exceptions.ConnectionError
            | redis.exceptions.TimeoutError
            | kombu.exceptions.OperationalError,
        ):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@click.group(cls=ImgprepGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imgprep")
def main() -> None:
    """imgprep: prepare virtual-machine disks with a fleet of Celery workers."""
    # Commands print for people; their logs are warnings and errors only. `worker` logs at
    # IMGPREP_LOG_LEVEL: Celery's setup_logging signal reconfigures it.
    configure_logging(level="WARNING", log_format=get_settings().log_format)
    # The result backend logs each retry while Redis is away (ImgprepGroup says it once)
    logging.getLogger("celery.backends").setLevel(logging.CRITICAL + 1)


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
