"""map + mount + inject + teardown: imgprep against the same commands typed in a shell script.

    .venv/bin/python -m bench.mount_inject [--runs 20]

For a raw disk and for a qcow2 overlay, with fuse2fs and with a kernel mount, each run maps
partition 1 of an MBR disk, mounts it, writes one 4 KiB file and tears everything down:

* `shell`   — bench/mount_inject_baseline.sh: sfdisk, blkid, qemu-storage-daemon, fuse2fs or
              losetup + mount, cp, chmod, umount, waiting for the daemons to exit;
* `domain`  — imgprep's map_partitions, mount_guest, inject_files and teardown called in one
              process, with the resource ledger and lease locks in a real redis-server;
* `helper`  — the same calls with their privileged operations (loop devices, mounts, exports,
              writes) sent to a real privileged helper (`python -m helper`) over its socket;
* `celery`  — the four steps as a chain through a real worker (broker round trips included).

Prints the median and 90th percentile of each, in milliseconds. Needs root and /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis
from celery import chain

from bench.report import Figure, report
from domain.cache.directory import CacheRecord, cache_key
from domain.core.models import (
    CachedImage,
    DiskSpec,
    FileInjection,
    ImageSource,
    InstanceDisk,
    PreparedDisk,
    PrepareRequest,
)
from domain.core.publish import FileStamp, record_path
from domain.core.runner import Runner
from domain.guest.context import DeviceContext
from domain.guest.injection import inject_files
from domain.guest.mapping import map_partitions
from domain.guest.mounting import mount_guest
from domain.guest.ports import PrivilegedOperations
from domain.guest.teardown import release_devices
from harness.privileges import HelperProcess, unprivileged_user
from harness.redis_server import RedisServer
from tasks.canvases import injection_steps, with_ids
from worker.app.application import create_app
from worker.cli.demo.ports import free_port
from worker.cli.demo.sample_images import Partition, partitioned_disk
from worker.cli.demo.worker_processes import start_worker
from worker.logs import configure_logging
from worker.privileges.helper_client import HelperClient
from worker.settings import MountSettings, Settings
from worker.stores.redis_ledger import RedisDeviceLedger
from worker.stores.redis_locks import RedisLockFactory

BASELINE = Path(__file__).with_name("mount_inject_baseline.sh")
PAYLOAD = os.urandom(4096)
GUEST_FILE = "/etc/imgprep-bench"


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(
    runs: int, setup: Callable[[], PreparedDisk], once: Callable[[PreparedDisk], None]
) -> list[float]:
    """Milliseconds of `once` on a fresh disk from `setup` (not timed), `runs` times."""
    once(setup())  # warm caches and imports; not counted
    samples = []
    for _ in range(runs):
        disk = setup()
        started = time.perf_counter()
        once(disk)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


class Bench:
    def __init__(self, root: Path, redis_url: str) -> None:
        self.root = root
        for name in ("cache", "instances", "state"):
            (root / name).mkdir(parents=True)
        # the base is a complete cache entry, with the record imgprep writes beside it: the
        # device steps take a backing file only then
        self.base = root / "cache" / cache_key("bench-base")
        partitioned_disk(self.base, [Partition(64, files={"/etc/hostname": b"bench\n"})])
        self.base_image = CachedImage(
            key=self.base.name,
            image_id="bench-base",
            path=str(self.base),
            format="raw",
            virtual_size=self.base.stat().st_size,
            source_sha256="0" * 64,
        )
        record = CacheRecord(
            image=self.base_image,
            source="bench",
            source_format="raw",
            source_bytes=self.base_image.virtual_size,
            fence=0,
            fetched_at=datetime.now(UTC),
            file=FileStamp.of(self.base),
        )
        record_path(self.base).write_text(record.model_dump_json())
        self.local = root / "payload"
        self.local.write_bytes(PAYLOAD)
        self.settings = Settings(
            redis_url=redis_url,
            cache_dir=root / "cache",
            instances_dir=root / "instances",
            state_dir=root / "state",
            host_id="bench",
        )
        self.client = redis.Redis.from_url(redis_url)
        self.locks = RedisLockFactory(self.client, lease=30, renew_every=10, wait=30)

    def disk(self, fmt: str) -> PreparedDisk:
        instance = f"vm-{uuid.uuid4().hex[:8]}"
        folder = self.root / "instances" / instance
        folder.mkdir()
        path = folder / "disk"
        if fmt == "raw":
            shutil.copyfile(self.base, path)
            with open(path, "rb+") as handle:  # fuse2fs fsyncs its image when it opens it:
                os.fsync(handle.fileno())  # write the copy back now, outside the timing
            size, backing = path.stat().st_size, None
        else:
            size, backing = 128 * 2**20, self.base
            create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing)]
            subprocess.run([*create, str(path), str(size)], check=True)
        (folder / "disk.info").write_text(json.dumps({"disk": fmt}))  # as imgprep records it
        return PreparedDisk(
            disk=InstanceDisk(
                host="bench",
                instance_id=instance,
                disk_name="disk",
                path=str(path),
                format="raw" if fmt == "raw" else "qcow2",
                virtual_size=size,
                backing_file=str(backing) if backing else None,
                backing_format="raw" if backing else None,
            ),
            base=self.base_image,
        )

    def request(self, prepared: PreparedDisk) -> PrepareRequest:
        return PrepareRequest(
            image=ImageSource(url="http://unused.invalid/", image_id="b"),
            disk=DiskSpec(
                instance_id=prepared.disk.instance_id, size_bytes=prepared.disk.virtual_size
            ),
            inject=(FileInjection(path=GUEST_FILE, content=PAYLOAD.hex()[:4096]),),
            partition=1,
        )

    def shell(self, method: str) -> Callable[[PreparedDisk], None]:
        def once(prepared: PreparedDisk) -> None:
            fmt = prepared.disk.format
            work = self.root / "state" / f"shell-{uuid.uuid4().hex[:8]}"
            work.mkdir()
            subprocess.run(
                [
                    "bash",
                    str(BASELINE),
                    fmt,
                    prepared.disk.path,
                    str(self.base),
                    str(work),
                    method,
                    GUEST_FILE,
                    str(self.local),
                ],
                check=True,
            )
            work.rmdir()

        return once

    def domain(
        self,
        method: str,
        privileged: PrivilegedOperations | None = None,
        devices_dir: Path | None = None,
    ) -> Callable[[PreparedDisk], None]:
        """The domain calls; their privileged operations in this process, or by `privileged`
        (whose work areas are in its own tree, `devices_dir`)."""
        policy = MountSettings(kernel_mount="always" if method == "kernel" else "never")

        def once(prepared: PreparedDisk) -> None:
            request = self.request(prepared)
            ctx = DeviceContext(
                runner=Runner(),
                ledger=RedisDeviceLedger(self.client, "bench"),
                locks=self.locks,
                policy=policy,
                state_dir=self.settings.state_dir,
                instances_dir=self.settings.instances_dir,
                cache_dir=self.settings.cache_dir,
                host="bench",
                owner=uuid.uuid4().hex,
                worker="bench",
                privileged=privileged,
                devices_dir=devices_dir,
            )
            mapped = map_partitions(prepared, 1, ctx)
            mounted = mount_guest(mapped, ctx)
            inject_files(mounted, request.inject, ctx)
            release_devices(f"{prepared.disk.instance_id}/disk", ctx)

        return once


def celery_runs(bench: Bench, redis_url: str, runs: int, fmt: str) -> list[float]:
    env = {
        **os.environ,
        "IMGPREP_REDIS_URL": redis_url,
        "IMGPREP_CACHE_DIR": str(bench.settings.cache_dir),
        "IMGPREP_INSTANCES_DIR": str(bench.settings.instances_dir),
        "IMGPREP_STATE_DIR": str(bench.settings.state_dir),
        "IMGPREP_HOST_ID": "bench",
        "IMGPREP_LOG_LEVEL": "WARNING",
        # one root process, whatever this host's /etc/imgprep says: the `helper` path measures
        # the privileged helper
        "IMGPREP_PRIVILEGES__HELPER_SOCKET": "",
        "IMGPREP_PRIVILEGES__USER": "",
    }
    app = create_app(bench.settings)
    worker = start_worker(
        nodename=f"bench-{os.getpid()}@{socket.gethostname()}",
        log_path=bench.root / "worker.log",
        env=env,
        concurrency=1,
    )
    try:
        worker.wait_ready(app, timeout=60)

        def once(prepared: PreparedDisk) -> None:
            operation = uuid.uuid4().hex
            steps = injection_steps(bench.request(prepared), host="bench", operation=operation)
            steps[0] = steps[0].clone(args=(prepared.model_dump(mode="json"),))
            bound = [app.signature(dict(step)) for step in steps]
            chain(*with_ids(bound, operation).tasks, app=app).apply_async()
            app.AsyncResult(operation).get(timeout=60)

        return measure(runs, lambda: bench.disk(fmt), once)
    finally:
        worker.stop()


def record(fmt: str, method: str, rows: dict[str, list[float]]) -> None:
    """The figure of one disk format and mount method: imgprep (through Celery where it was
    measured, else the domain calls) against the shell script."""
    ours_path = "celery" if "celery" in rows else "domain"
    ours, shell = statistics.median(rows[ours_path]), statistics.median(rows["shell"])
    report(
        Figure(
            name=f"mount_inject_{fmt}_{method}",
            ours=ours,
            baseline=shell,
            unit="ms (median)",
            target="ours/script <= 1.5",
            met=ours <= 1.5 * shell,
            notes=dict[str, object](
                (path, f"median {statistics.median(s):.1f} ms, p90 {percentile(s, 0.9):.1f} ms")
                for path, s in rows.items()
            )
            | {"ours is": ours_path},
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        raise SystemExit("needs root and /dev/fuse")
    configure_logging(level="WARNING", log_format="console")
    with (
        tempfile.TemporaryDirectory(prefix="imgprep-bench-") as temp,
        contextlib.ExitStack() as stack,
    ):
        root = Path(temp)
        server = RedisServer(root / "redis", free_port()).start()
        stack.callback(server.stop)
        bench = Bench(root / "work", server.url)
        unprivileged_user()  # the helper serves it (the bench itself calls it as root)
        helper = stack.enter_context(HelperProcess.start(bench.root))
        privileged = HelperClient(helper.socket_path)
        print(f"{'disk':<6}{'mount':<9}{'path':<8}{'median ms':>10}{'p90 ms':>9}")
        for fmt in ("raw", "qcow2"):
            for method in ("fuse2fs", "kernel"):
                setup = functools.partial(bench.disk, fmt)
                rows = [
                    ("shell", measure(args.runs, setup, bench.shell(method))),
                    ("domain", measure(args.runs, setup, bench.domain(method))),
                    (
                        "helper",
                        measure(
                            args.runs, setup, bench.domain(method, privileged, helper.devices_dir)
                        ),
                    ),
                ]
                if method == "fuse2fs":
                    rows.append(("celery", celery_runs(bench, server.url, args.runs, fmt)))
                for name, samples in rows:
                    print(
                        f"{fmt:<6}{method:<9}{name:<8}{statistics.median(samples):>10.1f}"
                        f"{percentile(samples, 0.9):>9.1f}"
                    )
                record(fmt, method, dict(rows))


if __name__ == "__main__":
    main()
