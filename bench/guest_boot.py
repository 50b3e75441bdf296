"""Booting what imgprep prepared: a qcow2 instance disk of the Debian test guest, prepared by a
real worker with two files injected, booted under qemu to its guest's report, against a bare
`qemu-img create` overlay of the same cached base booted the same way (interleaved runs, the
medians). Target: ours <= 1.1 x the bare overlay: what imgprep did to a disk costs its guest
nothing at boot. The notes also give the guest image's build (cold, or found in its cache), the
guest's own uptime at its report, and the accelerator.

    .venv/bin/python -m bench.guest_boot [--runs 3]
"""

from __future__ import annotations

import argparse
import subprocess
import uuid

from bench.report import Figure, median, report
from bench.stack import stack
from domain.core.models import DiskSpec, FileInjection, ImageSource, PrepareRequest
from worker.cli.demo.guest_boot import BootDisk, GuestReport, boot_guest, choose_accelerator
from worker.cli.demo.guest_image import guest_image
from worker.cli.demo.guest_recipe import AUTHORIZED_KEYS_PATH, MESSAGE_PATH
from worker.cli.demo.image_server import ImageServer
from worker.logs import configure_logging

DISK = 2 * 2**30


def run(runs: int) -> Figure:
    obtained = guest_image()
    image = obtained.image
    ours: list[GuestReport] = []
    bare: list[GuestReport] = []
    with stack(workers=1, concurrency=2) as made, ImageServer(image.directory) as server:
        source = ImageSource(
            url=server.url(image.qcow2.name),
            image_id=f"bench-guest-{image.key[:12]}",
            checksum=f"sha256:{image.qcow2_sha256}",
            declared_format="qcow2",
        )
        for n in range(runs):
            instance = f"vm-{uuid.uuid4().hex[:12]}"
            request = PrepareRequest(
                image=source,
                disk=DiskSpec(instance_id=instance, size_bytes=DISK),
                inject=(
                    FileInjection(path=MESSAGE_PATH, content=f"bench run {n}\n"),
                    FileInjection(
                        path=AUTHORIZED_KEYS_PATH, content=f"ssh-ed25519 AAAA {instance}\n"
                    ),
                ),
            )
            prepared = made.client.wait_prepared(made.client.prepare_disk(request), timeout=600)
            consoles = made.root / "consoles"
            ours.append(
                boot_guest(BootDisk.file(prepared.disk.path, "qcow2"), consoles / f"{instance}.log")
            )
            overlay = made.root / f"bare-{n}.qcow2"
            bare_overlay = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw"]
            bare_overlay += ["-b", prepared.base.path, str(overlay), str(DISK)]
            subprocess.run(bare_overlay, check=True)
            bare.append(boot_guest(BootDisk.file(overlay, "qcow2"), consoles / f"bare-{n}.log"))
            overlay.unlink()
    ratio = median([r.seconds for r in ours]) / median([r.seconds for r in bare])
    return Figure(
        name="guest_boot",
        ours=median([r.seconds for r in ours]),
        baseline=median([r.seconds for r in bare]),
        unit="s to the guest's report (median)",
        target="ours/bare overlay <= 1.1",
        met=ratio <= 1.1,
        notes={
            "runs": runs,
            "accelerator": choose_accelerator(),
            "guest uptime at its report, ours (bare), s": (
                f"{median([r.done_uptime for r in ours]):.2f} "
                f"({median([r.done_uptime for r in bare]):.2f})"
            ),
            "guest image": (
                f"{'built' if obtained.built else 'found in its cache'} in "
                f"{obtained.seconds:.1f} s ({image.directory})"
            ),
            "ours": "qcow2 overlay prepared by a worker, an authorized_keys and a message injected",
            "baseline": "qemu-img create -f qcow2 -b <the same cached base>, nothing injected",
        },
    )


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    report(run(parser.parse_args().runs))


if __name__ == "__main__":
    main()
