"""qemu-img: one function per operation, argument lists built here and nowhere else.

`info` always pins the format (`-f`), shares the image (`--force-share`), prints JSON and runs
under process limits, because the header it parses comes from an untrusted image service.
Callers inspect the bytes (domain.formats.inspection) before any of these touch a downloaded file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from domain.core.errors import ImageInUse, ImageRefused, ImgprepError
from domain.core.runner import CommandError, CommandResult, Limits, Runner
from domain.core.space import disk_full, out_of_space

QEMU_IMG = "qemu-img"


class ImageInfo(BaseModel):
    """The fields of `qemu-img info --output=json` that imgprep reads."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    filename: str
    format: str
    virtual_size: int = Field(alias="virtual-size", ge=0)
    actual_size: int | None = Field(default=None, alias="actual-size")
    cluster_size: int | None = Field(default=None, alias="cluster-size")
    backing_filename: str | None = Field(default=None, alias="backing-filename")
    full_backing_filename: str | None = Field(default=None, alias="full-backing-filename")
    backing_format: str | None = Field(default=None, alias="backing-filename-format")
    dirty: bool = Field(default=False, alias="dirty-flag")
    format_specific: dict[str, object] | None = Field(default=None, alias="format-specific")

    @property
    def data_file(self) -> str | None:
        """The external data file of a qcow2, if its header names one."""
        data = (self.format_specific or {}).get("data")
        if isinstance(data, dict):
            value = data.get("data-file")
            return str(value) if value else None
        return None


def info(runner: Runner, path: Path, fmt: str, limits: Limits) -> ImageInfo:
    """`qemu-img info` of one image, format pinned, under limits, parsed into ImageInfo.

    A failure is an ImageRefused: the header comes from an untrusted source, and a qemu-img
    killed or starved under its limits is an image that asked for too much. Only running past
    the wall-clock timeout (slow storage) is CommandTimedOut, which may be retried.
    """
    argv = [QEMU_IMG, "info", "-f", fmt, "--force-share", "--output=json", str(path)]
    try:
        result = runner.run(argv, limits=limits, timeout=120)
    except CommandError as error:
        raise _info_refusal(error, path, limits) from None
    try:
        return ImageInfo.model_validate(json.loads(result.stdout))
    except (ValueError, ValidationError) as error:
        raise ImageRefused(
            f"qemu-img info printed no usable JSON for {path.name}: {error}"
        ) from None


def create_overlay(
    runner: Runner, path: Path, *, backing: Path, backing_format: str, size: int
) -> None:
    """Create a qcow2 with `backing` as its backing file and `size` bytes of virtual size."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing)]
    _run(runner, [*argv, str(path), str(size)], path)


def create(runner: Runner, path: Path, *, fmt: str, size: int) -> None:
    """Create an empty image of `size` bytes."""
    _run(runner, [QEMU_IMG, "create", "-q", "-f", fmt, str(path), str(size)], path)


def resize(runner: Runner, path: Path, *, fmt: str, size: int) -> None:
    """Grow an image to `size` bytes; the format is always pinned (CVE-2026-24708)."""
    _run(runner, [QEMU_IMG, "resize", "-q", "-f", fmt, str(path), str(size)], path)


OUT_OF_MEMORY = re.compile(r"Cannot allocate memory|Could not allocate|[Oo]ut of memory")
LOCKED = re.compile(r"Failed to get .*lock|Is another process using the image")
PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def convert(
    runner: Runner,
    source: Path | str,
    target: Path,
    *,
    source_format: str,
    target_format: str,
    cache_mode: str,
    compress: bool = False,
    sparse: bool = True,
    needed: int | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> CommandResult:
    """`qemu-img convert` with the source format pinned and the target cache mode given; the
    source is a file, or a qemu filename of another protocol (`rbd:pool/image:conf=...`).

    A full target filesystem is DiskFull (`needed`: the bytes the caller expected to write).
    """
    argv = [QEMU_IMG, "convert", "-f", source_format, "-O", target_format, "-t", cache_mode]
    if compress:
        argv.append("-c")
    if not sparse:
        argv += ["-S", "0"]
    try:
        if on_progress is not None:
            return runner.stream(
                [*argv, "-p", str(source), str(target)],
                on_line=lambda line: _report_progress(line, on_progress),
            )
        return runner.run([*argv, str(source), str(target)])
    except CommandError as error:
        raise _failure(error, target, needed) from None


def _report_progress(line: str, on_progress: Callable[[float], None]) -> None:
    match = PROGRESS.search(line)
    if match:
        on_progress(float(match.group(1)))


def _run(runner: Runner, argv: list[str], target: Path) -> CommandResult:
    try:
        return runner.run(argv)
    except CommandError as error:
        raise _failure(error, target) from None


def _info_refusal(error: CommandError, path: Path, limits: Limits) -> ImageRefused:
    result = error.result
    if result is not None and result.killed_by is not None:
        return ImageRefused(
            f"qemu-img info on {path.name} was killed by {result.killed_by} under its limits "
            f"({limits.describe()}); the image is refused as a possible resource bomb"
        )
    if result is not None and OUT_OF_MEMORY.search(result.stderr):
        return ImageRefused(
            f"qemu-img info on {path.name} ran out of memory under its limits "
            f"({limits.describe()}); the image is refused as a possible resource bomb: {error}"
        )
    return ImageRefused(f"qemu-img cannot read {path.name}: {error}")


def _failure(error: CommandError, target: Path, needed: int | None = None) -> ImgprepError:
    """A failed qemu-img write mapped to its error class."""
    stderr = error.result.stderr if error.result is not None else ""
    if out_of_space(stderr):
        return disk_full(target, needed)
    if LOCKED.search(stderr):
        return ImageInUse(f"{error}; a running guest holds the image, stop it first")
    return error
