"""A full prepare with injection on a cached image — cache hit, overlay, map, mount, inject,
teardown — through real workers, against a shell script of the same commands (qemu-img create,
then bench/mount_inject_baseline.sh). Target: ours ≤ 1.5 x the script.

    .venv/bin/python -m bench.full_prepare [--runs 20]
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import time
import uuid
from pathlib import Path

from bench.report import Figure, median, percentile, report
from bench.stack import MiB, stack
from domain.core.models import DiskSpec, FileInjection, ImageSource, PrepareRequest
from worker.cli.demo.sample_images import Partition, partitioned_disk
from worker.logs import configure_logging

BASELINE = Path(__file__).resolve().parent / "mount_inject_baseline.sh"
DISK = 1024 * MiB
CONTENT = b"injected by imgprep\n" * 200  # 4 KiB


def run(runs: int) -> Figure:
    with stack(workers=1, concurrency=2) as made:
        partitioned_disk(
            made.server.root / "guest.raw",
            [Partition(size_mib=64, files={"/etc/hostname": b"guest\n"})],
        )
        url = made.server.url("guest.raw")
        injection = FileInjection(
            path="/etc/imgprep-bench",
            content=base64.b64encode(CONTENT).decode(),
            encoding="base64",
            mode=0o644,
        )

        def request() -> PrepareRequest:
            return PrepareRequest(
                image=ImageSource(url=url, image_id="bench-guest"),
                disk=DiskSpec(instance_id=f"vm-{uuid.uuid4().hex[:12]}", size_bytes=DISK),
                inject=(injection,),
            )

        warm = made.client.wait_prepared(made.client.prepare_disk(request()), timeout=120)
        base = warm.base.path
        local = made.root / "content"
        local.write_bytes(CONTENT)
        ours, shell = [], []
        for _ in range(runs):
            started = time.perf_counter()
            made.client.wait_prepared(made.client.prepare_disk(request()), timeout=120)
            ours.append(time.perf_counter() - started)

            work = made.root / f"sh-{uuid.uuid4().hex[:8]}"
            work.mkdir()
            disk = work / "disk"
            started = time.perf_counter()
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    "-b",
                    base,
                    str(disk),
                    str(DISK),
                ],
                check=True,
            )
            subprocess.run(
                [
                    "bash",
                    str(BASELINE),
                    "qcow2",
                    str(disk),
                    base,
                    str(work / "w"),
                    "fuse2fs",
                    "/etc/imgprep-bench",
                    str(local),
                ],
                check=True,
            )
            shell.append(time.perf_counter() - started)
            subprocess.run(["rm", "-rf", str(work)], check=True)
    ratio = median(ours) / median(shell)
    return Figure(
        name="full_prepare_with_injection",
        ours=median(ours) * 1000,
        baseline=median(shell) * 1000,
        unit="ms (median)",
        target="ours/script <= 1.5",
        met=ratio <= 1.5,
        notes={
            "runs": runs,
            "ours p90 ms": round(percentile(ours, 0.9) * 1000, 1),
            "script p90 ms": round(percentile(shell, 0.9) * 1000, 1),
            "disk": "qcow2 overlay on a cached raw base (MBR, 64 MiB ext4), fuse2fs",
            "ours includes": "entry task (cache hit, pin), overlay with disk.info, "
            "qemu-storage-daemon FUSE view, fuse2fs mount, openat2 write, "
            "teardown, ledger records, 5 tasks and their results",
        },
    )


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    report(run(parser.parse_args().runs))


if __name__ == "__main__":
    main()
