"""`imgprep demo`: the main job on one machine, end to end, with real parts.

Builds a small guest disk (MBR, one ext4 partition, converted to qcow2), serves it over a
local HTTP server, starts a worker, prepares two instance disks from it at once, each with a
file injected into its guest filesystem, prints every step with its duration, how many times
the image was downloaded and the injected file read back from each disk, and stops what it
started.

With `--boot` the image is a bootable Debian 12 guest instead (worker/cli/demo/guest_image.py:
built from Debian's packages on first use, then reused), and after preparing them the demo boots
both disks under qemu and prints what each guest printed on its console: the message injected
into it.

With `--backend rbd` it first starts a throwaway one-node Ceph cluster
(worker.cli.demo.ceph_cluster), and the disks are clones of the image imported into it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import click
import redis

from domain.cache.networks import loopback_allowed
from domain.core.errors import ImgprepError
from domain.core.models import DiskSpec, FileInjection, ImageSource, PreparedDisk, PrepareRequest
from domain.core.runner import Limits, Runner
from domain.formats import qemu_img
from helper import capabilities
from worker.cli.demo.ceph_cluster import CephCluster
from worker.cli.demo.guest_boot import (
    BootDisk,
    GuestBootFailed,
    GuestReport,
    boot_guest,
    choose_accelerator,
)
from worker.cli.demo.guest_files import read_guest_file
from worker.cli.demo.guest_image import GuestBuildFailed, guest_image
from worker.cli.demo.guest_recipe import MESSAGE_PATH
from worker.cli.demo.image_server import ImageServer
from worker.cli.demo.sample_images import Partition, partitioned_disk
from worker.cli.demo.worker_processes import WorkerProcess, start_worker
from worker.cli.sizes import human
from worker.settings import Settings, ensure_directories, get_settings
from worker.stores.redis_connect import redis_client

DISK_SIZE = 1 * 2**30
BOOT_DISK_SIZE = 2 * 2**30  # the guest image is 1 GiB
MOTD = b"Prepared by imgprep.\n"
INJECTED = "/etc/imgprep-demo"


def say(label: str, text: str) -> None:
    click.echo(f"  {label:<12}{text}")


def build_image(directory: Path) -> tuple[Path, str]:
    """A reproducible qcow2 guest image: MBR, one ext4 partition with a few files."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / "demo.raw"
    image = directory / "demo.qcow2"
    partitioned_disk(
        raw, [Partition(size_mib=48, files={"/etc/motd": MOTD, "/etc/hostname": b"demo\n"})]
    )
    image.unlink(missing_ok=True)
    Runner().run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)])
    raw.unlink()
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    return image, digest


def redis_answers(settings: Settings) -> bool:
    try:
        client = redis_client(settings.coordination, settings.redis, socket_connect_timeout=3)
        return bool(client.ping())
    except (redis.RedisError, ValueError):
        return False


def guest_for_boot() -> tuple[Path, str] | None:
    """The Debian guest image (qcow2) and its sha256, built or taken from its cache."""
    say("guest", "a Debian 12 guest image, built from Debian's packages on first use")
    try:
        obtained = guest_image(say=lambda text: say("", text))
    except GuestBuildFailed as error:
        say("failed", str(error))
        return None
    image = obtained.image
    if obtained.built:
        how = f"built in {obtained.seconds:.1f} s (kept in {image.directory.parent} for next time)"
    else:
        how = f"reused from {image.directory} in {obtained.seconds:.2f} s"
    kernel = image.version_of("linux-image-cloud-amd64")
    say("image", f"{image.qcow2.name}: Debian 12, kernel {kernel}, {how}")
    return image.qcow2, image.qcow2_sha256


def run_demo(*, keep_worker: bool = False, boot: bool = False, backend: str = "qcow2") -> int:
    if backend != "rbd":
        return _run(keep_worker=keep_worker, boot=boot)
    settings = get_settings()
    ensure_directories(settings)
    directory = settings.state_dir / "demo" / f"ceph-{os.getpid()}"
    directory.mkdir(parents=True, mode=0o755)
    directory.parent.chmod(0o755)
    t0 = time.monotonic()
    ceph = CephCluster(directory, cephx=True)
    try:
        ceph.start()
        click.echo(
            f"ceph cluster {ceph.fsid} on 127.0.0.1:{ceph.port} (a monitor, a memstore OSD, "
            f"cephx), pools vms and images, up in {time.monotonic() - t0:.2f} s"
        )
        return _run(keep_worker=keep_worker, boot=boot, ceph=ceph)
    finally:
        ceph.stop()
        shutil.rmtree(directory, ignore_errors=True)
        click.echo(f"ceph cluster {ceph.fsid} stopped")


def _run(*, keep_worker: bool, boot: bool, ceph: CephCluster | None = None) -> int:
    started = time.monotonic()
    settings = get_settings()
    ensure_directories(settings)
    click.echo("imgprep demo")
    if not redis_answers(settings):
        say(
            "redis",
            f"{settings.coordination} does not answer: start redis-server or set IMGPREP_REDIS_URL",
        )
        return 1
    say("redis", f"{settings.coordination} answers")

    t0 = time.monotonic()
    if boot:
        found = guest_for_boot()
        if found is None:
            return 1
        image, digest = found
    else:
        image, digest = build_image(settings.state_dir / "demo")
    info = qemu_img.info(
        Runner(), image, "qcow2", Limits(cpu_seconds=30, address_space_bytes=2 * 2**30)
    )
    say(
        "image",
        f"{image.name}: qcow2, {human(info.virtual_size)} virtual, {human(image.stat().st_size)} "
        f"file, sha256 {digest[:16]}…, {'ready' if boot else 'built'} in "
        f"{time.monotonic() - t0:.2f} s",
    )

    from worker.app import app

    nodename = f"imgprep-demo-{os.getpid()}@{socket.gethostname()}"
    worker: WorkerProcess | None = None
    with ImageServer(image.parent) as server:
        say("serving", server.url(image.name))
        try:
            t0 = time.monotonic()
            worker = start_worker(
                nodename=nodename,
                log_path=settings.state_dir / "demo" / "worker.log",
                # the demo serves its image on this host: its worker may fetch from loopback
                env={
                    **os.environ,
                    "IMGPREP_FETCH__DENIED_NETWORKS": json.dumps(loopback_allowed()),
                    **_own_helper_socket(settings),
                    **(_own_cluster(ceph) if ceph is not None else {}),
                },
            )
            worker.wait_ready(app, timeout=60)
            say(
                "worker",
                f"{nodename} ready in {time.monotonic() - t0:.2f} s (log: {worker.log_path})",
            )
            say("privileges", _privileges(worker))
            ok, prepared = _prepare_two(server, image, digest, boot=boot, ceph=ceph)
            say("downloads", f"{server.gets(image.name)} GET of the image for 2 requests")
            if ceph is not None:
                imported = [name for name in ceph.images("images") if ".part." not in name]
                say("imported", f"{len(imported)} image in the pool images: {', '.join(imported)}")
        finally:
            if worker is not None and not keep_worker:
                worker.stop()
                say("stopped", f"worker {nodename}")
    if boot and ok:
        ok = _boot_all(prepared, settings.state_dir / "demo", ceph)
    say("total", f"{time.monotonic() - started:.2f} s")
    return 0 if ok else 1


def _own_cluster(ceph: CephCluster) -> dict[str, str]:
    """The demo's worker on its throwaway cluster, as a host of its own: a worker already
    serving this host (on another cluster, or none) must not take the demo's steps."""
    return {**ceph.env(), "IMGPREP_HOST_ID": f"demo-rbd-{os.getpid()}"}


def demo_host(ceph: CephCluster | None) -> str | None:
    """The host the demo's requests name: its worker's own with a cluster, else any."""
    return _own_cluster(ceph)["IMGPREP_HOST_ID"] if ceph is not None else None


def _own_helper_socket(settings: Settings) -> dict[str, str]:
    """A worker that starts its helper needs a socket of its own (one socket serves one worker):
    the demo's worker gets one beside the configured socket, so that it does not take over the
    socket of a worker already running on this host."""
    privileges = settings.privileges
    if not privileges.helper_socket or not privileges.start_helper or os.geteuid() != 0:
        return {}
    own = Path(privileges.helper_socket).with_name(f"demo-{os.getpid()}.sock")
    return {"IMGPREP_PRIVILEGES__HELPER_SOCKET": str(own)}


def _privileges(worker: WorkerProcess) -> str:
    """Who the worker's pool processes run as, with which capabilities, and its helper."""
    pool = worker.pool_pids()
    users = sorted({_status(pid) for pid in pool})
    text = f"pool processes {', '.join(map(str, pool))} run as {'; '.join(users)}"
    helpers = worker.helper_pids()
    if helpers:
        return f"{text}; the privileged helper {helpers[0]} as {_status(helpers[0])}"
    return f"{text} (privilege separation off: README, Privileges)"


def _status(pid: int) -> str:
    """`user (uid N), capabilities …` of a process, from /proc/<pid>/status."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    uid = int(fields["Uid"].split()[1])  # the effective uid
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = "?"
    held = capabilities.describe(int(fields["CapEff"], 16))
    caps = f"capabilities {' '.join(held)}" if held else "no capabilities"
    return f"{user} (uid {uid}), {caps}"


def _prepare_two(
    server: ImageServer, image: Path, digest: str, *, boot: bool, ceph: CephCluster | None
) -> tuple[bool, list[tuple[PrepareRequest, PreparedDisk]]]:
    """Two disks prepared at once from `image`; whether both are right, and the disks."""
    from worker.app import app
    from worker.app.signals import journal
    from worker.cli.client import Client
    from worker.cli.operation_state import read_status
    from worker.cli.status import render_status

    client = Client(app)
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    source = ImageSource(
        url=server.url(image.name),
        image_id=f"demo-{digest[:16]}",
        checksum=f"sha256:{digest}",
        declared_format="qcow2",
    )
    requests = [
        PrepareRequest(
            image=source,
            disk=DiskSpec(
                instance_id=f"demo-{stamp}-{n}",
                size_bytes=BOOT_DISK_SIZE if boot else DISK_SIZE,
                backend="rbd" if ceph is not None else "qcow2",
            ),
            host=demo_host(ceph),
            inject=(
                FileInjection(
                    path=MESSAGE_PATH if boot else INJECTED,
                    content=f"Disk demo-{stamp}-{n}, by imgprep.\n",
                ),
            ),
        )
        for n in (1, 2)
    ]
    t0 = time.monotonic()
    results = [client.prepare_disk(request) for request in requests]
    say("prepare", f"{len(results)} requests sent for image {source.image_id}")

    def wait(result: object) -> PreparedDisk | ImgprepError:
        try:
            return client.wait_prepared(result, timeout=300)
        except ImgprepError as error:
            return error

    with ThreadPoolExecutor(len(results)) as pool:
        outcomes = list(pool.map(wait, results))
    elapsed = time.monotonic() - t0
    ok = True
    prepared = []
    for request, result, outcome in zip(requests, results, outcomes, strict=True):
        click.echo("")
        say("instance", request.disk.instance_id)
        tree = render_status(read_status(app, journal(), result.id))
        click.echo("\n".join(" " * 14 + line for line in tree.splitlines()))
        if isinstance(outcome, PreparedDisk):
            say(
                "disk",
                f"{outcome.disk.path} ({outcome.disk.format}, {human(outcome.disk.virtual_size)})",
            )
            say(
                "backing",
                f"{outcome.base.path} ({outcome.base.format}, {human(outcome.base.virtual_size)})",
            )
            ok = _show_injected(outcome, request, ceph) and ok
            prepared.append((request, outcome))
        else:
            ok = False
            say("failed", f"{type(outcome).__name__}: {outcome}")
    click.echo("")
    say(
        "prepared",
        f"{sum(isinstance(o, PreparedDisk) for o in outcomes)} of {len(outcomes)} disks "
        f"in {elapsed:.2f} s",
    )
    return ok, prepared


def _boot_all(
    prepared: list[tuple[PrepareRequest, PreparedDisk]], work: Path, ceph: CephCluster | None
) -> bool:
    """Boot every prepared disk at once under qemu and print what its guest printed."""
    accel = choose_accelerator()
    how = "KVM" if accel == "kvm" else "TCG emulation (KVM cannot run guests on this machine)"
    click.echo("")
    say("booting", f"{len(prepared)} disks at once under qemu-system-x86_64, {how}")

    def boot(disk: PreparedDisk) -> GuestReport | GuestBootFailed:
        console = work / f"{disk.disk.instance_id}.console"
        try:
            return boot_guest(_boot_disk(disk, ceph), console)
        except GuestBootFailed as error:
            return error

    with ThreadPoolExecutor(len(prepared)) as pool:
        reports = list(pool.map(boot, [disk for _, disk in prepared]))
    ok = True
    for (request, disk), report in zip(prepared, reports, strict=True):
        click.echo("")
        say("instance", f"{disk.disk.instance_id} ({disk.disk.path})")
        if isinstance(report, GuestBootFailed):
            say("failed", str(report))
            ok = False
            continue
        for line in report.lines:
            say("console", line)
        seen = report.message == request.inject[0].data().decode()
        say(
            "booted",
            f"and powered off in {report.seconds:.1f} s (guest uptime {report.done_uptime:.1f} s); "
            + ("its guest printed the injected message" if seen else "THE MESSAGE DIFFERS"),
        )
        ok = ok and seen
    return ok


def _boot_disk(prepared: PreparedDisk, ceph: CephCluster | None) -> BootDisk:
    """The disk as qemu opens it: a file, or the clone through qemu's rbd driver (as the
    cluster's admin, whose keyring the demo holds)."""
    if ceph is None:
        return BootDisk.file(prepared.disk.path, prepared.disk.format)
    keyring = ceph.directory / "admin.keyring"
    auth = f":id=admin:keyring={keyring}" if ceph.cephx else ""
    return BootDisk(f"{prepared.disk.path}:conf={ceph.directory / 'ceph.conf'}{auth}", "raw")


def _show_injected(
    prepared: PreparedDisk, request: PrepareRequest, ceph: CephCluster | None
) -> bool:
    """Print the injected file as read back from the disk by qemu-img and debugfs (an rbd disk:
    exported from the cluster by `rbd export` first)."""
    guest = prepared.guest
    if guest is None or not prepared.injected:
        say("injected", "nothing (the result names no injected file)")
        return False
    where = "whole disk" if guest.partition is None else f"partition {guest.partition}"
    item = prepared.injected[0]
    say(
        "injected",
        f"{item.path} ({item.size} bytes, mode {item.mode:04o}) into {where}, "
        f"{guest.filesystem}, mounted by {guest.mount}",
    )
    work = get_settings().state_dir / "demo"
    disk = Path(prepared.disk.path)
    if ceph is not None:
        disk = work / f"{prepared.disk.instance_id}.raw"
        ceph.rbd("export", "--no-progress", prepared.disk.path.removeprefix("rbd:"), str(disk))
    try:
        found = read_guest_file(disk, prepared.disk.format, guest.partition, item.path, work)
    finally:
        if ceph is not None:
            disk.unlink(missing_ok=True)
    expected = request.inject[0].data().decode()
    if found is None or found.content != expected or found.mode != item.mode:
        say("read back", f"{item.path} is missing or differs in {prepared.disk.path}")
        return False
    say("read back", f"{found.content.strip()!r} (mode {found.mode:04o}) from the disk itself")
    return True
