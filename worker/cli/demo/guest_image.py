"""The test guest's disk image, built from Debian's packages once and reused between runs.

`guest_image()` returns a bootable Debian 12 disk (guest_recipe.py says what is in it) as a raw
file and as a compressed qcow2, with a manifest. It is built in two stages, each kept in a cache
directory outside the checkout under the digest of its recipe:

    <cache>/rootfs-<key>/     debootstrap's tree, with its initramfs made (1-2 minutes cold)
    <cache>/guest-<key>/      disk.raw, disk.qcow2, guest.json (seconds, from the tree)

A stage is built into `.build-…` beside it and renamed into place, so a reader finds a complete
entry or none; one `flock` on `<cache>/lock` makes concurrent test processes build it once (the
kernel releases it when a builder dies, and the next holder removes what that one left). The
disk is put together without mounting anything: `mkfs.ext4 -d` makes the filesystem from the
tree, `sfdisk` the partition table, and GRUB's boot sector and core image (made by the guest's
own grub-mkimage) go into the MBR and the gap before the partition.

The cache is `$IMGPREP_TEST_GUEST_CACHE`, else /var/cache/imgprep-tests; the mirror is
`$IMGPREP_TEST_GUEST_MIRROR`, else the one this machine's apt uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from domain.core.runner import BASE_ENV, Runner
from domain.formats.partitions import SECTOR
from worker.cli.demo.guest_recipe import (
    FIXED_TIME,
    GRUB_PREFIX,
    LABEL_ID,
    PARTITION_START_MIB,
    GuestRecipe,
    RootfsRecipe,
    debian_mirror,
)

CACHE_ENV = "IMGPREP_TEST_GUEST_CACHE"
MIRROR_ENV = "IMGPREP_TEST_GUEST_MIRROR"
DEFAULT_CACHE = Path("/var/cache/imgprep-tests")
BUILDING = ".build-"
UNUSED_FOR_SECONDS = 30 * 86400  # entries of other recipes unused this long are removed
MiB = 2**20


class GuestBuildFailed(RuntimeError):
    """The guest image could not be built: the message names the step and its log."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: its disk as raw and as compressed qcow2, and what it was built from."""

    directory: Path
    key: str
    raw_sha256: str
    qcow2_sha256: str
    virtual_size: int
    packages: tuple[str, ...]  # `name version` of every package in the guest
    built_seconds: float  # how long its build took (both stages, or the second alone)

    @property
    def raw(self) -> Path:
        return self.directory / "disk.raw"

    @property
    def qcow2(self) -> Path:
        return self.directory / "disk.qcow2"

    def version_of(self, package: str) -> str | None:
        for line in self.packages:
            name, _, version = line.partition(" ")
            if name == package:
                return version
        return None


@dataclass(frozen=True)
class Obtained:
    """What `guest_image` did: the image, whether it was already there, and how long it took."""

    image: GuestImage
    built: bool
    seconds: float


def cache_directory() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def default_recipe() -> GuestRecipe:
    mirror = os.environ.get(MIRROR_ENV) or debian_mirror()
    return GuestRecipe(rootfs=RootfsRecipe(mirror=mirror))


def guest_image(
    recipe: GuestRecipe | None = None,
    cache: Path | None = None,
    *,
    say: Callable[[str], None] | None = None,
) -> Obtained:
    """The guest image of `recipe`, from the cache, or built (and cached) if it is not there."""
    recipe = recipe or default_recipe()
    cache = cache or cache_directory()
    tell = say or (lambda _text: None)
    started = time.monotonic()
    entry = cache / f"guest-{recipe.key()[:16]}"
    found = _read_entry(entry)
    if found is None:
        cache.mkdir(parents=True, exist_ok=True)
        with _build_lock(cache, tell):
            found = _read_entry(entry)
            if found is None:
                _remove_unfinished(cache)
                rootfs = _rootfs(recipe.rootfs, cache, tell)
                tell(f"making the disk from {rootfs.name}")
                _publish(entry, lambda work: _build_disk(recipe, rootfs, work, started))
                _remove_unused(cache, keep={entry.name, rootfs.name})
                built = _read_entry(entry)
                if built is None:
                    raise GuestBuildFailed(f"{entry} has no readable guest.json after its build")
                return Obtained(built, built=True, seconds=time.monotonic() - started)
    os.utime(entry / "guest.json")  # in use: kept by _remove_unused
    return Obtained(found, built=False, seconds=time.monotonic() - started)


def _read_entry(entry: Path) -> GuestImage | None:
    try:
        fields = json.loads((entry / "guest.json").read_text())
    except (OSError, ValueError):
        return None
    return GuestImage(
        directory=entry,
        key=fields["key"],
        raw_sha256=fields["raw_sha256"],
        qcow2_sha256=fields["qcow2_sha256"],
        virtual_size=fields["virtual_size"],
        packages=tuple(fields["packages"]),
        built_seconds=fields["built_seconds"],
    )


@contextlib.contextmanager
def _build_lock(cache: Path, tell: Callable[[str], None]) -> Iterator[None]:
    with open(cache / "lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tell(f"waiting for another process building in {cache}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(entry: Path, build: Callable[[Path], None]) -> None:
    """Run `build` in a fresh directory beside `entry`, then rename that directory into place."""
    work = Path(tempfile.mkdtemp(prefix=f"{BUILDING}{entry.name}-", dir=entry.parent))
    try:
        build(work)
        work.chmod(0o755)
        os.rename(work, entry)
    except BaseException:
        _remove_tree(work)
        raise


def _rootfs(recipe: RootfsRecipe, cache: Path, tell: Callable[[str], None]) -> Path:
    entry = cache / f"rootfs-{recipe.key()[:16]}"
    if (entry / "rootfs.json").is_file():
        os.utime(entry / "rootfs.json")
        return entry
    tell(f"debootstrap {recipe.suite} ({recipe.variant}) from {recipe.mirror}")
    _publish(entry, lambda work: _build_rootfs(recipe, work))
    return entry


def _build_rootfs(recipe: RootfsRecipe, work: Path) -> None:
    started = time.monotonic()
    tree = work / "tree"
    log = work / "debootstrap.log"
    argv = [
        "debootstrap",
        f"--variant={recipe.variant}",
        f"--include={','.join(recipe.packages)}",
        recipe.suite,
        str(tree),
        recipe.mirror,
    ]
    try:
        _logged(argv, log, timeout=1800)
        initramfs = tree / "etc/initramfs-tools"
        (initramfs / "initramfs.conf").write_text(recipe.initramfs_conf)
        (initramfs / "modules").write_text("".join(f"{m}\n" for m in recipe.initramfs_modules))
        for name, script in recipe.initramfs_scripts:
            path = initramfs / "scripts" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(script)
            path.chmod(0o755)
        _logged(["chroot", str(tree), "update-initramfs", "-u", "-k", "all"], log, timeout=600)
        packages = _logged(
            ["chroot", str(tree), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"],
            log,
            timeout=60,
        )
    finally:
        _unmount_under(work)  # debootstrap killed half-way leaves /proc and /sys mounted
    for removed in recipe.removed:
        _remove_tree(tree / removed)
        (tree / removed).mkdir(parents=True)
    record = {
        "key": recipe.key(),
        "recipe": asdict(recipe),
        "packages": sorted(packages.splitlines()),
        "seconds": round(time.monotonic() - started, 1),
    }
    (work / "rootfs.json").write_text(json.dumps(record, indent=2, default=list) + "\n")


def _build_disk(recipe: GuestRecipe, rootfs: Path, work: Path, started: float) -> None:
    runner = Runner(default_timeout=600, env={**BASE_ENV, "E2FSPROGS_FAKE_TIME": FIXED_TIME})
    staging = work / "tree"
    # A tree of hard links to the root filesystem's files: files are added beside them or
    # replace them (never written through a link), so the cached tree stays as it was.
    runner.run(["cp", "-al", str(rootfs / "tree"), str(staging)])
    for guest_path, (content, mode) in recipe.added_files().items():
        target = staging / guest_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        target.write_text(content)
        target.chmod(mode)
    core = staging / "tmp/imgprep-core.img"
    runner.run(
        [
            "chroot",
            str(staging),
            "grub-mkimage",
            "--format=i386-pc",
            f"--prefix={GRUB_PREFIX}",
            f"--output=/{core.relative_to(staging)}",
            *recipe.grub_modules,
        ]
    )
    core_image = core.read_bytes()
    core.unlink()
    boot_sector = (staging / "usr/lib/grub/i386-pc/boot.img").read_bytes()

    partition_offset = PARTITION_START_MIB * MiB
    if len(core_image) > partition_offset - SECTOR:
        raise GuestBuildFailed(f"GRUB's core image ({len(core_image)} bytes) does not fit")
    filesystem = work / "fs.img"
    with open(filesystem, "wb") as handle:
        handle.truncate(recipe.disk_mib * MiB - partition_offset)
    runner.run(["mkfs.ext4", "-q", "-F", *recipe.mkfs_options, "-d", str(staging), str(filesystem)])
    _remove_tree(staging)

    raw = work / "disk.raw"
    with open(raw, "wb") as handle:
        handle.truncate(recipe.disk_mib * MiB)
    table = (
        f"label: dos\nlabel-id: {LABEL_ID}\nunit: sectors\n\n"
        f"start={partition_offset // SECTOR}, type=83, bootable\n"
    )
    runner.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(raw)], stdin=table)
    with open(raw, "r+b") as disk:
        disk.write(boot_sector[:440])  # the boot code; the disk signature and table stay
        disk.seek(SECTOR)
        disk.write(core_image)
    _copy_sparse(filesystem, raw, partition_offset)
    filesystem.unlink()
    qcow2 = work / "disk.qcow2"
    runner.run(
        ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        timeout=1200,
    )
    rootfs_record = json.loads((rootfs / "rootfs.json").read_text())
    record = {
        "key": recipe.key(),
        "rootfs": rootfs.name,
        "raw_sha256": _sha256(raw),
        "qcow2_sha256": _sha256(qcow2),
        "virtual_size": raw.stat().st_size,
        "packages": rootfs_record["packages"],
        "built_seconds": round(time.monotonic() - started, 1),
    }
    (work / "guest.json").write_text(json.dumps(record, indent=2) + "\n")


def _copy_sparse(source: Path, target: Path, offset: int) -> None:
    """Copy `source` into `target` at `offset`, leaving its all-zero blocks as holes."""
    block = 4 * MiB
    with open(source, "rb") as src, open(target, "r+b") as dst:
        position = 0
        while chunk := src.read(block):
            if chunk.count(0) != len(chunk):
                dst.seek(offset + position)
                dst.write(chunk)
            position += len(chunk)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _logged(argv: list[str], log: Path, *, timeout: float) -> str:
    """Run `argv` with its stderr appended to `log`; its stdout, or GuestBuildFailed."""
    with open(log, "a") as errors:
        errors.write(f"$ {' '.join(argv)}\n")
        errors.flush()
        try:
            done = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                timeout=timeout,
                check=False,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
            )
        except subprocess.TimeoutExpired:
            raise GuestBuildFailed(f"{argv[0]} took over {timeout:.0f} s (log: {log})") from None
        errors.write(done.stdout)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise GuestBuildFailed(f"{' '.join(argv[:3])} failed ({done.returncode}):\n{tail}")
    return done.stdout


def _unmount_under(root: Path) -> None:
    """Unmount whatever is mounted below `root` (this build's own), deepest first."""
    prefix = str(root.resolve()) + "/"
    mounted = [
        line.split()[1].encode().decode("unicode_escape")
        for line in Path("/proc/mounts").read_text().splitlines()
    ]
    for point in sorted((m for m in mounted if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        _unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_unfinished(cache: Path) -> None:
    """Under the lock, a `.build-` directory is what a builder that died left behind."""
    for leftover in cache.glob(f"{BUILDING}*"):
        _remove_tree(leftover)


def _remove_unused(cache: Path, keep: set[str]) -> None:
    """Entries of other recipes (older checkouts) that nobody used for a month."""
    cutoff = time.time() - UNUSED_FOR_SECONDS
    for entry in [*cache.glob("guest-*"), *cache.glob("rootfs-*")]:
        record = entry / ("guest.json" if entry.name.startswith("guest-") else "rootfs.json")
        try:
            unused = record.stat().st_mtime < cutoff
        except FileNotFoundError:
            unused = True
        if entry.name not in keep and unused:
            _remove_tree(entry)
