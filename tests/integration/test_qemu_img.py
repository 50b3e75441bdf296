"""The qemu-img wrapper on the real qemu-img: limits that kill or starve it refuse the image,
errors arrive as their classes, the format is always pinned."""

from __future__ import annotations

import contextlib
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.core.errors import DiskFull, ImageInUse, ImageRefused
from domain.core.runner import BASE_ENV, Limits, Runner
from domain.formats import qemu_img
from tests.conftest import need_root, write_raw_image

MiB = 2**20
DEFAULT_LIMITS = Limits(cpu_seconds=30, address_space_bytes=2 * 2**30)


def create(path: Path, size: str, *options: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", *options, str(path), size], check=True)
    return path


def test_qemu_img_killed_under_its_memory_limit_refuses_the_image(
    runner: Runner, tmp_path: Path
) -> None:
    # Given a plain qcow2 and an address space too small for qemu-img to start its threads
    image = create(tmp_path / "small.qcow2", "64M", "-f", "qcow2")
    # When qemu-img info runs under that limit, it aborts (SIGABRT)
    with pytest.raises(ImageRefused) as refused:
        qemu_img.info(runner, image, "qcow2", Limits(address_space_bytes=16 * MiB))
    # Then that is a refusal of the image, naming the signal and the limits
    message = str(refused.value)
    assert "was killed by SIGABRT under its limits (16 MiB address space)" in message
    assert "possible resource bomb" in message


def test_qemu_img_killed_by_its_cpu_limit_refuses_the_image(runner: Runner, tmp_path: Path) -> None:
    # Given a qcow2 whose 32 MiB L1 table qemu-img must read and convert just to open it: tens
    # of milliseconds of CPU, several scheduler ticks (a small image can finish inside the
    # first tick, before the kernel ever checks the budget)
    image = create(tmp_path / "big-l1.qcow2", "128G", "-f", "qcow2", "-o", "cluster_size=512")
    # When qemu-img info runs with a CPU budget of zero seconds, the kernel kills it at a tick
    with pytest.raises(ImageRefused) as refused:
        qemu_img.info(runner, image, "qcow2", Limits(cpu_seconds=0))
    # Then that is a refusal naming the signal and the limit
    assert "was killed by SIGKILL under its limits (0 s CPU)" in str(refused.value)


def test_image_whose_metadata_outgrows_the_limit_is_refused(tmp_path: Path) -> None:
    # One malloc arena: each thread qemu-img starts may otherwise reserve a 64 MiB arena of
    # address space, so whether a plain image fits in a limit this tight would vary from run
    # to run (CI saw the plain image abort at 96 MiB once)
    runner = Runner(env={**BASE_ENV, "MALLOC_ARENA_MAX": "1"})
    # Given a qcow2 with 512-byte clusters and 128 GiB of virtual size: a 32 MiB L1 table that
    # qemu-img must hold in memory just to open it (a small-scale resource bomb)
    bomb = create(tmp_path / "bomb.qcow2", "128G", "-f", "qcow2", "-o", "cluster_size=512")
    plain = create(tmp_path / "plain.qcow2", "128G", "-f", "qcow2")
    tight = Limits(address_space_bytes=96 * MiB)
    # When qemu-img info reads it under a 96 MiB address space, it cannot allocate its tables
    # (it fails to allocate, or aborts, depending on which allocation hits the limit first)
    with pytest.raises(ImageRefused) as refused:
        qemu_img.info(runner, bomb, "qcow2", tight)
    assert re.search(
        r"(was killed by SIGABRT|ran out of memory) under its limits \(96 MiB address space\)",
        str(refused.value),
    )
    # Then an ordinary qcow2 of the same size passes under the same limit, and the bomb passes
    # under the default limits: the limit is what refused it
    assert qemu_img.info(runner, plain, "qcow2", tight).virtual_size == 128 * 2**30
    assert qemu_img.info(runner, bomb, "qcow2", DEFAULT_LIMITS).virtual_size == 128 * 2**30


def test_info_of_a_file_in_another_format_is_a_refusal(runner: Runner, tmp_path: Path) -> None:
    raw = write_raw_image(tmp_path / "disk.raw", size=MiB, data=b"raw")
    with pytest.raises(ImageRefused, match=r"qemu-img cannot read disk\.raw"):
        qemu_img.info(runner, raw, "qcow2", DEFAULT_LIMITS)


def test_resize_pins_the_format_against_a_guest_written_header(
    runner: Runner, tmp_path: Path
) -> None:
    # Given a raw disk whose guest wrote a qcow2 header (with a backing file) at its start
    disk = write_raw_image(tmp_path / "disk", size=8 * MiB, data=b"\0")
    header = create(tmp_path / "header.qcow2", "1M", "-f", "qcow2", "-u", "-F", "raw", "-b", "/x")
    with open(disk, "r+b") as handle:
        handle.write(header.read_bytes()[:4096])
    # When it is grown as raw
    qemu_img.resize(runner, disk, fmt="raw", size=16 * MiB)
    # Then it grew as a raw file, and its first bytes are still the guest's
    assert disk.stat().st_size == 16 * MiB
    assert disk.read_bytes()[:4096] == header.read_bytes()[:4096]


@contextlib.contextmanager
def small_tmpfs(root: Path, size: str) -> Iterator[Path]:
    need_root()
    mount_point = root / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                   check=True)  # fmt: skip
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        mount_point.rmdir()


def test_convert_into_a_full_filesystem_is_disk_full(runner: Runner, tmp_path: Path) -> None:
    # Given 8 MiB of data and a filesystem of 2 MiB
    source = write_raw_image(tmp_path / "src.raw", size=8 * MiB, data=b"\xaa" * (4 * MiB))
    # When qemu-img converts into it, it is DiskFull
    with (
        small_tmpfs(tmp_path, "2M") as full,
        pytest.raises(DiskFull, match="no space left on the filesystem"),
    ):
        qemu_img.convert(
            runner,
            source,
            full / "out.qcow2",
            source_format="raw",
            target_format="qcow2",
            cache_mode="writeback",
        )


def test_convert_of_an_image_held_by_a_running_guest_is_image_in_use(
    runner: Runner, tmp_path: Path
) -> None:
    # Given a qcow2 opened read-write by another qemu process (a running guest)
    image = create(tmp_path / "busy.qcow2", "16M", "-f", "qcow2")
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.read(len(b"qemu-io>")) == b"qemu-io>"  # it holds the image now
        # When it is converted
        with pytest.raises(ImageInUse, match="stop it first"):
            qemu_img.convert(
                runner,
                image,
                tmp_path / "copy.raw",
                source_format="qcow2",
                target_format="raw",
                cache_mode="writeback",
            )
    finally:
        holder.communicate(b"quit\n", timeout=30)
    assert not (tmp_path / "copy.raw").exists()
