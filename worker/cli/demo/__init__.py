"""`imgprep demo`: the end-to-end job on one machine (worker.cli.demo.end_to_end).

The demo's own real parts are beside it, in the wheel: a local image server (image_server,
http_serving), sample guest images (sample_images), the bootable Debian guest (guest_recipe,
guest_image, guest_boot, guest_files), `imgprep worker` processes (worker_processes) and a
throwaway one-node Ceph cluster for `--backend rbd` (ceph_cluster). The tests and benchmarks use
them too; what only they need is in the top-level `harness/`, which is not shipped.
"""

from __future__ import annotations

import sys

import click

from worker.cli import main


@main.command()
@click.option("--keep-worker", is_flag=True, help="Leave the demo's worker running.")
@click.option(
    "--boot",
    is_flag=True,
    help="Prepare the disks from a Debian 12 guest (built on first use, then cached) and boot "
    "them under qemu, printing what each guest prints on its console.",
)
@click.option(
    "--backend",
    type=click.Choice(["qcow2", "rbd"]),
    default="qcow2",
    show_default=True,
    help="rbd: the disks are clones in a throwaway one-node Ceph cluster the demo starts "
    "(ceph-mon, ceph-osd on 127.0.0.1) and stops.",
)
def demo(keep_worker: bool, boot: bool, backend: str) -> None:
    """Prepare two instance disks from a generated image served over HTTP, end to end."""
    from worker.cli.demo.end_to_end import run_demo

    sys.exit(run_demo(keep_worker=keep_worker, boot=boot, backend=backend))
