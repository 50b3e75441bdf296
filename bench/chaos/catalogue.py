"""The images a campaign serves: raw and qcow2 (so force_raw conversion happens), fast and slow,
some with an ext4 guest filesystem (so files can be injected), some requested with a checksum.

For every image the catalogue knows what the cache must end up holding: the sha256 of the served
bytes, and the sha256 of a fresh `qemu-img convert` of them to raw (for a raw image, the same
file). The data is drawn from the campaign's seed, so a seed always serves the same bytes.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from domain.cache.directory import cache_key
from worker.cli.demo.sample_images import Partition, partitioned_disk

MiB = 2**20
GUEST_FILE = "/etc/chaos-image"


@dataclass(frozen=True)
class SourceImage:
    """One image on the image server and what its cache entry must be."""

    name: str  # file name on the server
    image_id: str
    format: Literal["raw", "qcow2"]
    rate: int | None  # bytes per second the server sends it at; None: as fast as it goes
    checksum: bool  # requests for it name its sha256
    guest: bool  # it holds an MBR partition with ext4: files can be injected
    size: int  # bytes served
    sha256: str  # of the served bytes
    virtual_size: int
    cached_sha256: str  # of its raw conversion: what the cache entry must hold

    @property
    def key(self) -> str:
        return cache_key(self.image_id)


@dataclass(frozen=True)
class _Spec:
    name: str
    format: Literal["raw", "qcow2"]
    virtual_mib: int
    data_mib: int  # random bytes at the start; 0 for a guest image
    rate: int | None
    checksum: bool
    guest: bool = False


SPECS = (
    _Spec("fast-raw.img", "raw", 16, 2, None, checksum=False),
    _Spec("fast-qcow2.img", "qcow2", 32, 3, None, checksum=True),
    _Spec("slow-raw.img", "raw", 24, 8, 1 * MiB, checksum=True),  # 24 s: waiters wait long
    _Spec("slow-qcow2.img", "qcow2", 24, 4, 512 * 2**10, checksum=False),
    _Spec("guest-raw.img", "raw", 0, 0, 4 * MiB, checksum=True, guest=True),
    _Spec("guest-qcow2.img", "qcow2", 0, 0, 2 * MiB, checksum=False, guest=True),
)
GUEST_PARTITION_MIB = 16
LARGEST_VIRTUAL = 32 * MiB


def build_catalogue(directory: Path, seed: int) -> list[SourceImage]:
    """Write every image of SPECS into `directory` and describe it."""
    rng = random.Random(f"catalogue-{seed}")
    directory.mkdir(parents=True, exist_ok=True)
    images = []
    with tempfile.TemporaryDirectory(prefix="catalogue-", dir=directory.parent) as work:
        scratch = Path(work)
        for spec in SPECS:
            raw = scratch / f"{spec.name}.raw"
            if spec.guest:
                partitioned_disk(
                    raw,
                    [
                        Partition(
                            GUEST_PARTITION_MIB,
                            files={GUEST_FILE: f"seed {seed}\n".encode()},
                        )
                    ],
                )
            else:
                _random_raw(raw, spec.virtual_mib * MiB, spec.data_mib * MiB, rng)
            served = directory / spec.name
            if spec.format == "qcow2":
                _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(served))
            else:
                raw.rename(served)
            images.append(_describe(spec, served, seed, scratch))
    return images


def _describe(spec: _Spec, served: Path, seed: int, scratch: Path) -> SourceImage:
    fresh = scratch / f"{spec.name}.fresh"
    _run("qemu-img", "convert", "-f", spec.format, "-O", "raw", str(served), str(fresh))
    image = SourceImage(
        name=spec.name,
        image_id=f"chaos-{seed}-{spec.name.removesuffix('.img')}",
        format=spec.format,
        rate=spec.rate,
        checksum=spec.checksum,
        guest=spec.guest,
        size=served.stat().st_size,
        sha256=sha256_file(served),
        virtual_size=fresh.stat().st_size,
        cached_sha256=sha256_file(fresh),
    )
    fresh.unlink()
    return image


def _random_raw(path: Path, size: int, data: int, rng: random.Random) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.write(rng.randbytes(data))


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=300)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()
