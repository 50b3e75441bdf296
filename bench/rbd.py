"""The rbd backend against its baselines, on a one-node Ceph cluster the benchmark starts
(memstore OSD, cephx on, as production runs it), one worker with two pool processes:

1. cache-hit prepares: N prepares of an image already imported (import step finds it, clone,
   grow, rename), sent at once, against a bash loop of `rbd clone` + `rbd resize` (goal ≤ 1.5);
2. burst: 32 prepares of a new image on rbd (one download, one import), against the same burst
   on the qcow2 backend (one download, 32 overlays), in the same stack;
3. a prepare with injection on rbd (a clone exported by qemu-storage-daemon's rbd driver,
   fuse2fs, inject, teardown) against the same on qcow2, the image already there.

    .venv/bin/python -m bench.rbd [--count 30] [--burst 32] [--runs 7]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from bench.report import Figure, median, report
from bench.stack import MiB, Stack, stack, write_image
from domain.core.models import Backend, DiskSpec, FileInjection, ImageSource, PrepareRequest
from domain.rbd import names
from worker.cli.demo.ceph_cluster import CephCluster
from worker.cli.demo.sample_images import Partition, partitioned_disk
from worker.logs import configure_logging

DISK = 1024 * MiB
INJECTED = FileInjection(
    path="/etc/imgprep-bench",
    content=base64.b64encode(b"injected by imgprep\n" * 200).decode(),
    encoding="base64",
)


@contextmanager
def ceph_stack() -> Iterator[tuple[Stack, CephCluster]]:
    """A Ceph cluster (files readable by the workers' user) and a stack whose worker uses it."""
    directory = Path(tempfile.mkdtemp(prefix="imgprep-bench-ceph-", dir="/var/tmp"))
    directory.chmod(0o755)
    ceph = CephCluster(directory, cephx=True)
    try:
        ceph.start()
        # INFO: the burst counts the imports in the workers' logs
        env = {**ceph.env(), "IMGPREP_LOG_LEVEL": "INFO"}
        with stack(workers=1, concurrency=2, extra_env=env) as made:
            yield made, ceph
    finally:
        ceph.stop()
        shutil.rmtree(directory, ignore_errors=True)


def request(url: str, image_id: str, backend: Backend, *, inject: bool = False) -> PrepareRequest:
    return PrepareRequest(
        image=ImageSource(url=url, image_id=image_id),
        disk=DiskSpec(instance_id=f"vm-{uuid.uuid4().hex[:12]}", size_bytes=DISK, backend=backend),
        inject=(INJECTED,) if inject else (),
    )


def all_at_once(made: Stack, requests: list[PrepareRequest]) -> float:
    started = time.perf_counter()
    results = [made.client.prepare_disk(r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: made.client.wait_prepared(r, timeout=600), results))
    return time.perf_counter() - started


def clone_loop(ceph: CephCluster, parent: str, count: int) -> float:
    """`rbd clone` + `rbd resize` of `count` disks in a bash loop, as the workers' cephx user."""
    prefix = f"loop-{uuid.uuid4().hex[:6]}"
    env = ceph.env()
    ceph_args = f"--conf {env['IMGPREP_RBD__CONF']} --id {env['IMGPREP_RBD__USER']} " + (
        f"--keyring {env['IMGPREP_RBD__KEYRING']}"
    )
    script = (
        f"for i in $(seq {count}); do rbd clone {parent} vms/{prefix}-$i && "
        f"rbd resize --no-progress --size {DISK // MiB}M vms/{prefix}-$i; done"
    )
    started = time.perf_counter()
    subprocess.run(["bash", "-c", script], check=True, env={**os.environ, "CEPH_ARGS": ceph_args})
    elapsed = time.perf_counter() - started
    for i in range(1, count + 1):
        ceph.rbd("rm", "--no-progress", f"vms/{prefix}-{i}")
    return elapsed


def remove_disks(ceph: CephCluster, requests: list[PrepareRequest]) -> None:
    for made in requests:
        ceph.rbd("rm", "--no-progress", f"vms/{names.disk_image(made.disk.instance_id, 'disk')}")


def cache_hit(made: Stack, ceph: CephCluster, count: int, repeat: int) -> Figure:
    write_image(made.server.root / "hit.raw", size=DISK // 2, data_bytes=16 * MiB)
    url = made.server.url("hit.raw")
    warm = request(url, "bench-hit", "rbd")
    made.client.wait_prepared(made.client.prepare_disk(warm), timeout=600)
    remove_disks(ceph, [warm])
    parent = f"images/{names.image_name('bench-hit')}@snap"
    ours, loop = [], []
    for _ in range(repeat):
        loop.append(clone_loop(ceph, parent, count) / count)
        batch = [request(url, "bench-hit", "rbd") for _ in range(count)]
        ours.append(all_at_once(made, batch) / count)
        remove_disks(ceph, batch)
    return Figure(
        name="rbd_cache_hit_prepare",
        ours=median(ours) * 1000,
        baseline=median(loop) * 1000,
        unit="ms per disk",
        target="ours/baseline <= 1.5",
        met=median(ours) / median(loop) <= 1.5,
        notes={
            "prepares per batch": count,
            "worker": "1 worker, 2 pool processes, cephx on, memstore OSD",
            "ours ms per disk": [round(t * 1000, 1) for t in ours],
            "baseline ms per disk (rbd clone + rbd resize, bash loop)": [
                round(t * 1000, 1) for t in loop
            ],
            "ours includes": "entry task; import step (the image's record in Redis); clone "
            "step (lease, rbd clone, rbd resize, rbd rename into place); journal, events, "
            "result",
        },
    )


def burst(made: Stack, ceph: CephCluster, count: int, repeat: int) -> Figure:
    write_image(made.server.root / "burst.raw", size=DISK, data_bytes=256 * MiB)
    url = made.server.url("burst.raw")
    rbd_times, qcow2_times, downloads, imports = [], [], [], []
    for _ in range(repeat):
        before = made.server.gets("burst.raw")
        qcow2_id = uid("q")  # one new image for the whole qcow2 burst
        qcow2_times.append(
            all_at_once(made, [request(url, qcow2_id, "qcow2") for _ in range(count)])
        )
        image_id = uid("r")
        batch = [request(url, image_id, "rbd") for _ in range(count)]
        middle = made.server.gets("burst.raw")
        rbd_times.append(all_at_once(made, batch))
        downloads.append(made.server.gets("burst.raw") - middle)
        imports.append(imports_logged(made, names.image_name(image_id)))  # fmt: skip
        remove_disks(ceph, batch)
        assert middle - before == 1, "the qcow2 burst downloaded more than once"
    return Figure(
        name="rbd_burst_uncached",
        ours=median(rbd_times),
        baseline=median(qcow2_times),
        unit="s",
        target="ours/qcow2 burst, one download and one import",
        met=set(downloads) == {1} and set(imports) == {1},
        notes={
            "requests": count,
            "image": "1 GiB raw, 256 MiB of random data",
            "downloads per rbd burst": downloads,
            "imports per rbd burst": imports,
            "rbd seconds": [round(t, 3) for t in rbd_times],
            "qcow2 seconds": [round(t, 3) for t in qcow2_times],
            "rbd includes": "download, sha256, inspection, qemu-img convert into the images "
            "pool (cache none: every write acknowledged by the OSD), snapshot, protect, rename; "
            "32 clones",
            "qcow2 includes": "download, sha256, inspection, fsync, publish; 32 overlays",
        },
    )


def injection(made: Stack, ceph: CephCluster, runs: int) -> Figure:
    partitioned_disk(
        made.server.root / "guest.raw",
        [Partition(size_mib=64, files={"/etc/hostname": b"guest\n"})],
    )
    url = made.server.url("guest.raw")
    rbd_times: list[float] = []
    qcow2_times: list[float] = []
    backends: list[tuple[Backend, list[float]]] = [("qcow2", qcow2_times), ("rbd", rbd_times)]
    for backend, _ in backends:  # warm: the image cached and imported
        warm = request(url, "bench-guest", backend, inject=True)
        made.client.wait_prepared(made.client.prepare_disk(warm), timeout=600)
    for _ in range(runs):
        for backend, times in backends:
            made_request = request(url, "bench-guest", backend, inject=True)
            started = time.perf_counter()
            made.client.wait_prepared(made.client.prepare_disk(made_request), timeout=600)
            times.append(time.perf_counter() - started)
    return Figure(
        name="rbd_prepare_with_injection",
        ours=median(rbd_times) * 1000,
        baseline=median(qcow2_times) * 1000,
        unit="ms",
        target="rbd against qcow2, reported",
        met=True,
        notes={
            "runs": runs,
            "rbd ms": [round(t * 1000, 1) for t in rbd_times],
            "qcow2 ms": [round(t * 1000, 1) for t in qcow2_times],
            "both": "image already there; map (qemu-storage-daemon export), fuse2fs, inject, "
            "teardown through the privileged helper when the host config turns it on",
        },
    )


def imports_logged(made: Stack, key: str) -> int:
    """How many imports of `key` the workers' logs record (`rbd_image_imported`)."""
    return sum(
        1
        for log in (made.root / "logs").glob("*.log")
        for line in log.read_text(errors="replace").splitlines()
        if '"rbd_image_imported"' in line and key in line
    )


def uid(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:8]}"


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=30, help="cache-hit prepares per batch")
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--runs", type=int, default=7, help="prepares with injection")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["cache_hit", "burst", "injection"], default=None)
    args = parser.parse_args()
    with ceph_stack() as (made, ceph):
        if args.only in (None, "cache_hit"):
            report(cache_hit(made, ceph, args.count, args.repeat))
        if args.only in (None, "burst"):
            report(burst(made, ceph, args.burst, args.repeat))
        if args.only in (None, "injection"):
            report(injection(made, ceph, args.runs))


if __name__ == "__main__":
    main()
