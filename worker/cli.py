"""The `imgprep` command: run a worker, enqueue and follow operations, run the demo."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from tasks.canvases import DEFAULT_QUEUE, host_queue
from tasks.errors import ImgprepError
from tasks.models import PrepareRequest
from worker.logs import configure_logging
from worker.settings import ensure_directories, get_settings
from worker.sizes import human, parse_size
from worker.status import OperationStatus

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


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a worker. Options such as --hostname and --concurrency go to `celery worker`.

    The worker consumes the shared queue `imgprep` and its host's queue
    `imgprep.host.<IMGPREP_HOST_ID>` unless -Q/--queues is given.
    """
    settings = get_settings()
    ensure_directories(settings)
    from worker.app import app

    argv = ["worker", "--loglevel", settings.log_level, *celery_args]
    if not any(arg in ("-Q", "--queues") or arg.startswith("--queues=") for arg in celery_args):
        argv += ["--queues", f"{DEFAULT_QUEUE},{host_queue(settings.host_id)}"]
    app.worker_main(argv=argv)


@main.command()
@click.argument("image_url")
@click.option("--image-id", required=True, help="Image id; the cache key is a hash of it.")
@click.option("--instance", "instance_id", required=True, help="Instance id (a path-safe name).")
@click.option(
    "--size", "size_bytes", required=True, type=SizeType(), help="Disk size: 10G, 512M, bytes."
)
@click.option("--disk-name", default="disk", show_default=True)
@click.option("--checksum", default=None, help="sha256:HEX of the image as served.")
@click.option("--host", default=None, help="Host whose queue runs the host-local steps.")
@click.option("--wait/--no-wait", default=False, help="Block until the disk is ready.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def prepare(
    *,
    image_url: str,
    image_id: str,
    instance_id: str,
    size_bytes: int,
    disk_name: str,
    checksum: str | None,
    host: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Fetch IMAGE_URL into the cache and create an instance disk on it."""
    request = _request_or_exit(
        {
            "image": {"url": image_url, "image_id": image_id, "checksum": checksum},
            "disk": {"instance_id": instance_id, "disk_name": disk_name, "size_bytes": size_bytes},
            "host": host,
        }
    )
    from worker.client import Client

    client = Client()
    result = client.prepare_disk(request)
    if not wait:
        click.echo(json.dumps({"task_id": result.id}) if as_json else result.id)
        return
    try:
        prepared = client.wait_prepared(result, timeout=timeout)
    except ImgprepError as error:
        _fail(f"prepare failed: {type(error).__name__}: {error}", as_json, result.id, error)
    except Exception as error:  # a timeout, a lost broker: the operation's state is unknown
        _fail(f"prepare did not finish: {type(error).__name__}: {error}", as_json, result.id, error)
    if as_json:
        click.echo(json.dumps({"task_id": result.id, **prepared.model_dump(mode="json")}, indent=2))
    else:
        disk, base = prepared.disk, prepared.base
        click.echo(f"disk  {disk.path} ({disk.format}, {human(disk.virtual_size)})")
        click.echo(
            f"base  {base.path} ({base.format}, {human(base.virtual_size)}, image {base.image_id})"
        )
        click.echo(f"task  {result.id}")


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(task_id: str, as_json: bool) -> None:
    """Show an operation's state and each step of its canvas."""
    from worker.app import app
    from worker.signals import journal
    from worker.status import read_status

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


@main.command()
@click.option("--keep-worker", is_flag=True, help="Leave the demo's worker running.")
def demo(keep_worker: bool) -> None:
    """Prepare two instance disks from a generated image served over HTTP, end to end."""
    from worker.demo import run_demo

    sys.exit(run_demo(keep_worker=keep_worker))


def _request_or_exit(payload: dict[str, Any]) -> PrepareRequest:
    from pydantic import ValidationError

    from worker.taskbase import describe_validation

    try:
        return PrepareRequest.model_validate(payload)
    except ValidationError as error:
        click.echo(f"imgprep: {describe_validation(error)}", err=True)
        sys.exit(EXIT_USAGE)


def _fail(message: str, as_json: bool, task_id: str, error: BaseException) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {"task_id": task_id, "error_type": type(error).__name__, "error": str(error)}
            )
        )
    click.echo(f"imgprep: {message}", err=True)
    sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
