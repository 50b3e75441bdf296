"""Hostile images, built for real with qemu-img and a few bytes of Python.

Each is what an image service under an attacker's control could serve: a qcow2 whose backing
file or external data file is a host file, a VMDK descriptor whose extents are host files, a
qcow2 declared as raw, a truncated header, noise declared as qcow2. Every one comes with the
format it is declared as and the words its refusal must contain.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20


@dataclass(frozen=True)
class Hostile:
    """How to build one hostile image, what it is declared as, and why it must be refused."""

    name: str
    declared: str
    reason: str  # a fragment of the refusal message
    build: Callable[[Path], None]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)


def backing_absolute(path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(path), "1M")


def backing_relative(path: Path) -> None:
    # -u: do not open the backing file, whatever directory the image is created in
    backing = "../../../etc/passwd"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing, str(path), "1M")


def backing_without_format(path: Path) -> None:
    # qemu-img 7 no longer writes a backing file without its format; the header takes one anyway
    qemu_img("create", "-q", "-f", "qcow2", str(path), "1M")
    name = b"/etc/shadow"
    with open(path, "r+b") as handle:
        handle.seek(8)
        handle.write(struct.pack(">QI", 1024, len(name)))
        handle.seek(1024)
        handle.write(name)


def external_data_file(path: Path) -> None:
    # qemu-img creates the data file it names: a file of the test's, standing for a host file
    host_file = path.with_name(path.name + ".host-file")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={host_file}", str(path), "1M")


def vmdk_flat_extent(path: Path) -> None:
    path.write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        "# Extent description\n"
        'RW 2048 FLAT "/etc/passwd" 0\n'
        "\n"
        'ddb.virtualHWVersion = "4"\n'
    )


def vmdk_descriptor_relative_extent(path: Path) -> None:
    # no '/' in the extent: oslo's descriptor check alone would let it through
    path.write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        'createType="monolithicSparse"\n'
        'RW 2048 SPARSE "neighbour.vmdk"\n'
    )


def qcow2_image(path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")


def truncated_header(path: Path) -> None:
    whole = path.with_name(path.name + ".whole")
    qcow2_image(whole)
    path.write_bytes(whole.read_bytes()[:100])
    whole.unlink()


def noise(path: Path) -> None:
    path.write_bytes(os.urandom(MiB))


HOSTILE = (
    Hostile("backing-absolute", "auto", "names a backing file ('/etc/passwd')", backing_absolute),
    Hostile(
        "backing-relative",
        "qcow2",
        "names a backing file ('../../../etc/passwd')",
        backing_relative,
    ),
    Hostile(
        "backing-without-format",
        "auto",
        "names a backing file ('/etc/shadow')",
        backing_without_format,
    ),
    Hostile("external-data-file", "qcow2", "names an external data file", external_data_file),
    Hostile(
        "vmdk-flat-extent",
        "vmdk",
        "bare descriptor file (createType monolithicflat) whose extents are other files",
        vmdk_flat_extent,
    ),
    Hostile(
        "vmdk-descriptor-relative-extent",
        "auto",
        "bare descriptor file (createType monolithicsparse)",
        vmdk_descriptor_relative_extent,
    ),
    Hostile(
        "qcow2-declared-raw", "raw", "declared raw but its bytes are in qcow2 format", qcow2_image
    ),
    Hostile(
        "truncated-header",
        "auto",
        "starts like a qcow2 image but its header is truncated or malformed",
        truncated_header,
    ),
    Hostile(
        "noise-declared-qcow2",
        "qcow2",
        "declared qcow2 but its bytes are not a qcow2 image",
        noise,
    ),
)


def build(hostile: Hostile, directory: Path, name: str | None = None) -> Path:
    path = directory / (name or hostile.name)
    hostile.build(path)
    return path
