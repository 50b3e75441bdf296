"""Real boots: the disks imgprep prepares are booted by a real Debian 12 guest, and the guest
itself reports what was injected.

The guest image is built from Debian's packages once per recipe and cached outside the checkout
(worker/cli/demo/guest_image.py); the session's workers fetch it from a local HTTP server as raw
and as a compressed qcow2 (converted to raw by force_raw), prepare instance disks on both
backends with an authorized_keys and a message injected, and qemu boots each disk (TCG where KVM
cannot run guests). A disk passes only when its guest printed the marker and the injected files
on its serial console, and the cached base it was made from is byte-for-byte what it was before
the boot. The snapshot round trip boots a disk made from the snapshot of a disk a guest wrote to.

The prepared disks boot in parallel (one guest per core) in a module fixture; each case is its
own test. The tier's other tests check the harness itself (a disk that cannot boot, a guest
past its timeout, the KVM probe) and `imgprep demo --boot`. `pytest -m boot` runs it alone.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from domain.core.models import ImageSource, PreparedDisk, PrepareRequest
from domain.formats.snapshot_models import ConvertedImage, SnapshotRequest
from harness.machine import processes_mentioning
from tests.integration.conftest import Cluster, unique
from tests.support.boots import DISK_SIZE, assert_reports_injected, boot, request_for, sha256
from worker.cli.demo.guest_boot import (
    ACCEL_ENV,
    QEMU,
    BootDisk,
    GuestBootFailed,
    GuestReport,
    boot_guest,
    choose_accelerator,
    kvm_usable,
    probe_runs,
)
from worker.cli.demo.guest_files import read_guest_file
from worker.cli.demo.guest_image import GuestImage, guest_image
from worker.cli.demo.guest_recipe import BOOT_RECORDS
from worker.cli.demo.image_server import ImageServer

pytestmark = [pytest.mark.boot, pytest.mark.timeout(1800)]

BOOTS_AT_ONCE = max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Case:
    source: str  # the format the image is served in
    backend: str  # disk.backend of the instance disk

    def __str__(self) -> str:
        return f"{self.source}-image-{self.backend}-disk"


# Both sources and both backends: a qcow2 image on a raw disk is the snapshot round trip's (its
# snapshot is a qcow2 image, and the disk made from it is raw), so it is not booted twice.
CASES = [Case("raw", "qcow2"), Case("raw", "raw"), Case("qcow2", "qcow2")]


@dataclass(frozen=True)
class Booted:
    request: PrepareRequest
    prepared: PreparedDisk
    report: GuestReport
    base_sha256_before: str
    base_sha256_after: str


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return guest_image().image


@pytest.fixture(scope="module")
def guest_server(guest: GuestImage) -> Iterator[ImageServer]:
    with ImageServer(guest.directory) as server:
        yield server


@pytest.fixture(scope="module")
def consoles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("consoles")


@pytest.fixture(scope="module")
def booted(
    cluster: Cluster, guest: GuestImage, guest_server: ImageServer, consoles: Path
) -> dict[Case, Booted]:
    """Every case prepared by the session's workers, then booted, `BOOTS_AT_ONCE` at a time."""
    sources = {
        "raw": ImageSource(
            url=guest_server.url(guest.raw.name),
            image_id=unique("guest-raw"),
            checksum=f"sha256:{guest.raw_sha256}",
            declared_format="raw",
        ),
        "qcow2": ImageSource(
            url=guest_server.url(guest.qcow2.name),
            image_id=unique("guest-qcow2"),
            checksum=f"sha256:{guest.qcow2_sha256}",
            declared_format="qcow2",
        ),
    }
    requests = {
        case: request_for(sources[case.source], case.backend, f"Hello from {case}, by imgprep.\n")
        for case in CASES
    }
    results = {case: cluster.client.prepare_disk(request) for case, request in requests.items()}
    prepared = {
        case: cluster.client.wait_prepared(result, timeout=600) for case, result in results.items()
    }
    bases = sorted({Path(p.base.path) for p in prepared.values()})
    with ThreadPoolExecutor(len(bases)) as pool:
        before = dict(zip(bases, pool.map(sha256, bases), strict=True))
    with ThreadPoolExecutor(BOOTS_AT_ONCE) as pool:
        reports = dict(
            zip(
                CASES,
                pool.map(lambda case: boot(prepared[case], consoles), CASES),
                strict=True,
            )
        )
    with ThreadPoolExecutor(len(bases)) as pool:
        after = dict(zip(bases, pool.map(sha256, bases), strict=True))
    return {
        case: Booted(
            requests[case],
            prepared[case],
            reports[case],
            before[Path(prepared[case].base.path)],
            after[Path(prepared[case].base.path)],
        )
        for case in CASES
    }


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_prepared_disk_boots_and_its_guest_reports_the_injected_files(
    case: Case, booted: dict[Case, Booted], guest: GuestImage, clean_cluster: Cluster
) -> None:
    # Given the guest image fetched by imgprep (a qcow2 image converted to raw by force_raw)
    # and an instance disk prepared from it on `case.backend` with two files injected
    outcome = booted[case]
    assert outcome.prepared.base.format == "raw"
    assert outcome.prepared.disk.format == case.backend
    assert outcome.prepared.disk.virtual_size == DISK_SIZE

    # When qemu booted the disk (the fixture did, next to the other cases)
    report = outcome.report

    # Then the guest booted Debian's kernel from the disk's own boot loader and reported the
    # injected files as they were asked for, owned by root, and a disk of the requested size
    assert report.kernel.endswith("-cloud-amd64")
    assert guest.version_of("linux-image-cloud-amd64") is not None
    assert_reports_injected(report, outcome.request)
    assert report.message == f"Hello from {case}, by imgprep.\n"
    assert report.disks == {"vda": DISK_SIZE}
    assert report.earlier_boots == ()  # a new disk: no boot before this one
    # and the cached base it was made from is unchanged, byte for byte
    assert outcome.base_sha256_before == outcome.base_sha256_after
    if case.source == "raw":
        assert outcome.base_sha256_after == guest.raw_sha256


def test_a_snapshot_of_a_booted_disk_boots_with_what_its_guest_wrote(
    booted: dict[Case, Booted], clean_cluster: Cluster, consoles: Path
) -> None:
    # Given a qcow2 overlay whose guest booted, recorded its boot on the disk and powered off
    first = booted[Case("raw", "qcow2")]
    disk = Path(first.prepared.disk.path)
    recorded = read_guest_file(disk, "qcow2", 1, BOOT_RECORDS, consoles)
    assert recorded is not None and recorded.content == f"{first.report.boot_id}\n"

    # When imgprep snapshots it, fetches the snapshot as a new image, prepares a raw disk from
    # it with a new message, and qemu boots that disk
    target = f"{unique('boots')}/guest.qcow2"
    snapshot = ConvertedImage.model_validate(
        clean_cluster.client.send(
            "imgprep.snapshot",
            SnapshotRequest(
                instance_id=first.prepared.disk.instance_id, target=target, format="qcow2"
            ).model_dump(mode="json"),
        ).get(timeout=600)
    )
    snapshot_path = Path(snapshot.path)
    with ImageServer(snapshot_path.parent) as server:
        source = ImageSource(
            url=server.url(snapshot_path.name),
            image_id=unique("guest-snapshot"),
            checksum=f"sha256:{snapshot.sha256}",
            declared_format="qcow2",
        )
        request = request_for(source, "raw", "Booted again from a snapshot.\n")
        prepared = clean_cluster.client.wait_prepared(
            clean_cluster.client.prepare_disk(request), timeout=600
        )
    report = boot(prepared, consoles)

    # Then the new guest finds the first guest's boot record, and the newly injected files
    assert report.earlier_boots == (first.report.boot_id,)
    assert report.boot_id != first.report.boot_id
    assert_reports_injected(report, request)
    assert report.message == "Booted again from a snapshot.\n"


def test_a_disk_that_cannot_boot_fails_at_once_with_its_console(tmp_path: Path) -> None:
    # Given a disk without a boot loader
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as handle:
        handle.truncate(16 * 2**20)
    console = tmp_path / "console.log"

    # When it is booted
    started = time.monotonic()
    with pytest.raises(GuestBootFailed, match="never reported that it booted"):
        boot_guest(BootDisk.file(blank, "raw"), console, timeout=240)

    # Then the firmware gave up and the machine ended by itself, long before the timeout
    assert time.monotonic() - started < 120
    assert not processes_mentioning(console, (QEMU,))


def test_a_guest_that_outlives_its_timeout_is_stopped(tmp_path: Path, guest: GuestImage) -> None:
    # Given a disk of the guest (an overlay of the cached image, which qemu opens read-only)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(guest.raw),
            "-F",
            "raw",
            str(overlay),
        ],
        check=True,
    )
    console = tmp_path / "console.log"

    # When its boot gets less time than any boot takes
    with pytest.raises(GuestBootFailed, match="did not power off within 2 s; stopped it"):
        boot_guest(BootDisk.file(overlay, "qcow2"), console, timeout=2)

    # Then its qemu was stopped, and the image is untouched
    assert not processes_mentioning(console, (QEMU,))
    assert sha256(guest.raw) == guest.raw_sha256


def test_demo_boot_boots_the_disks_it_prepared(clean_cluster: Cluster, guest: GuestImage) -> None:
    # Given the guest image in its cache (the demo builds it when it is not)
    # When a newcomer runs the demo with --boot
    done = clean_cluster.cli("demo", "--boot", timeout=900)

    # Then it reused the image, prepared two disks, and each guest printed its injected message
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"reused from {guest.directory}" in done.stdout
    assert "prepared    2 of 2 disks" in done.stdout
    says = [line for line in done.stdout.splitlines() if "imgprep-guest: says Disk demo-" in line]
    assert len(says) == 2, done.stdout
    assert done.stdout.count("its guest printed the injected message") == 2


def test_the_accelerator_probe_tells_a_machine_that_runs_from_one_that_does_not() -> None:
    # Given the probe guest (a boot sector that ends qemu through its debug-exit port)
    # When it runs under TCG, which always runs guests, and with no time to run
    # Then it runs to its end under TCG, and a probe that cannot finish counts as not running
    assert probe_runs("tcg")
    assert not probe_runs("tcg", timeout=0.001)
    # and KVM is chosen exactly when it runs the probe (never on a nested PVM host)
    if not os.environ.get(ACCEL_ENV):
        assert choose_accelerator() == ("kvm" if kvm_usable() else "tcg")
