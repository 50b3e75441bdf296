"""The recipe of the test guest: a Debian 12 system that boots, reports what it finds, and stops.

Everything that decides the guest's bytes is here, as data: the Debian suite, mirror and
packages of its root filesystem, how its initramfs is made, the init that reports to the serial
console, the boot loader's configuration and the disk layout. `rootfs_key` and `image_key` are
digests of it, so a change to any of it builds a new guest (guest_image.py), and nothing else
does.

The guest's init (`INIT_SCRIPT`, PID 1) prints lines starting with `imgprep-guest:` to the
serial console (guest_boot.py parses them):

    imgprep-guest: booted <kernel release> boot <boot id> uptime <seconds>
    imgprep-guest: disk <name> <bytes>                       each virtio disk the guest sees
    imgprep-guest: file <path> mode <octal> owner <uid>:<gid> size <bytes> base64 <content>
    imgprep-guest: missing <path>                            a reported file that is not there
    imgprep-guest: says <first line of the message file>     for people reading the console
    imgprep-guest: earlier <boot id>                         a boot recorded on this disk before
    imgprep-guest: recorded <boot id>                        this boot, now recorded on the disk
    imgprep-guest: root read-only                            the filesystem is clean for the host
    imgprep-guest: done uptime <seconds>

then powers the machine off. It writes to its own disk (the boot record under
/var/lib/imgprep-guest), so a snapshot of the disk carries what the guest did.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUITE = "bookworm"  # Debian 12
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# linux-image-cloud-amd64: Debian's kernel for virtual machines (virtio, no hardware drivers);
# initramfs-tools: the initramfs; grub-pc-bin: the boot loader, run from the guest's own files.
PACKAGES = ("linux-image-cloud-amd64", "initramfs-tools", "grub-pc-bin")

# The initramfs holds the drivers of the boot disk and nothing else (ext4 is built into the
# kernel): 6 MiB instead of 15, and fewer devices to probe under emulation.
INITRAMFS_CONF = "MODULES=list\nBUSYBOX=auto\nKEYMAP=n\nCOMPRESS=gzip\nRUNSIZE=10%\nFSTYPE=ext4\n"
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk")
# ...and runs without udev: initramfs-tools loads the modules above by name, the kernel makes
# /dev/vda1 in devtmpfs, and starting udevd and replaying every device's events cost about 7 s
# of a 16 s boot under TCG. Scripts in /etc/initramfs-tools/scripts replace Debian's of the same
# name (mkinitramfs copies them over); init-bottom keeps the one thing Debian's does that the
# system needs, moving /dev to the root filesystem.
INITRAMFS_SCRIPTS = {
    "init-top/udev": """#!/bin/sh
# imgprep's test guest: no udev in the initramfs (see worker/cli/demo/guest_recipe.py)
[ "$1" = prereqs ] && exit 0
exit 0
""",
    "init-bottom/udev": """#!/bin/sh -e
# imgprep's test guest: no udev to stop; /dev moves to the root filesystem as Debian's script does
[ "$1" = prereqs ] && exit 0
mount -n -o move /dev "${rootmnt:?}/dev" || mount -n --move /dev "${rootmnt}/dev"
if command -v nuke >/dev/null; then nuke /dev; else rm -rf /dev; fi
ln -s "${rootmnt}/dev" /dev
""",
}

# What the guest does not need: package caches and lists, documentation, translations.
REMOVED = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)

# The files the guest reports. Tests and the demo inject them; the message is also printed as
# text (its first line) for people reading the console.
MESSAGE_PATH = "/etc/imgprep-guest/message"
AUTHORIZED_KEYS_PATH = "/root/.ssh/authorized_keys"
REPORTED_PATHS = (MESSAGE_PATH, AUTHORIZED_KEYS_PATH)
BOOT_RECORDS = "/var/lib/imgprep-guest/boots"
INIT_PATH = "/usr/local/sbin/imgprep-guest-init"
PREFIX = "imgprep-guest:"

INIT_SCRIPT = f"""#!/bin/sh
# imgprep's test guest: report what this disk holds to the serial console, record this boot on
# the disk, leave the filesystem clean, and power off. Runs as PID 1 (init= on the kernel's
# command line); the kernel panics if it ever exits, and panic=1 with qemu's -no-reboot ends
# the machine then too.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
say() {{ echo "{PREFIX} $*"; }}
uptime() {{ cut -d" " -f1 /proc/uptime; }}
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
boot_id=$(cat /proc/sys/kernel/random/boot_id)
say "booted $(uname -r) boot $boot_id uptime $(uptime)"
for disk in /sys/block/vd*; do
  [ -e "$disk/size" ] && say "disk ${{disk##*/}} $(( $(cat "$disk/size") * 512 ))"
done
for path in {" ".join(REPORTED_PATHS)}; do
  if [ -f "$path" ]; then
    say "file $path $(stat -c 'mode %a owner %u:%g size %s' "$path") base64 $(base64 -w0 < "$path")"
  else
    say "missing $path"
  fi
done
if [ -f {MESSAGE_PATH} ]; then
  say "says $(head -n1 {MESSAGE_PATH} | tr -cd '[:print:]')"
fi
if [ -f {BOOT_RECORDS} ]; then
  while read -r earlier; do say "earlier $earlier"; done < {BOOT_RECORDS}
fi
mkdir -p {Path(BOOT_RECORDS).parent}
echo "$boot_id" >> {BOOT_RECORDS}
sync
say "recorded $boot_id"
mount -o remount,ro / && say "root read-only"
say "done uptime $(uptime)"
echo o > /proc/sysrq-trigger
sleep 60
"""

# GRUB's core image is written into the gap after the MBR and reads /boot/grub/grub.cfg from
# the partition; the guest's root is the first partition of its first virtio disk.
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "normal", "linux", "configfile")
GRUB_PREFIX = "(hd0,msdos1)/boot/grub"
KERNEL_COMMAND_LINE = f"root=/dev/vda1 rw console=ttyS0,115200 init={INIT_PATH} panic=1 quiet"
GRUB_CFG = f"""set timeout=0
linux /vmlinuz {KERNEL_COMMAND_LINE}
initrd /initrd.img
boot
"""

FSTAB = "/dev/vda1 / ext4 defaults 0 1\n"
HOSTNAME = "imgprep-guest\n"

# The disk: MBR, one ext4 partition from 1 MiB to the end (the boot loader lives in between).
DISK_MIB = 1024
PARTITION_START_MIB = 1
FIXED_UUID = "6b3e0c1a-0f5e-4f1e-9a57-2f0c4f3b9d11"
LABEL_ID = "0x1b3e0c1a"
FIXED_TIME = "1700000000"
# Inode tables and journal written out at build time: a first boot does not spend its time (and
# the instance disk's space) initialising them.
MKFS_OPTIONS = (
    "-L",
    "root",
    "-U",
    FIXED_UUID,
    "-E",
    f"hash_seed={FIXED_UUID},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
)


@dataclass(frozen=True)
class RootfsRecipe:
    """What the root filesystem is made of: debootstrap's suite, mirror and packages."""

    suite: str = SUITE
    mirror: str = DEFAULT_MIRROR
    variant: str = "minbase"
    packages: tuple[str, ...] = PACKAGES
    initramfs_conf: str = INITRAMFS_CONF
    initramfs_modules: tuple[str, ...] = INITRAMFS_MODULES
    initramfs_scripts: tuple[tuple[str, str], ...] = tuple(INITRAMFS_SCRIPTS.items())
    removed: tuple[str, ...] = REMOVED

    def key(self) -> str:
        return _digest(asdict(self))


@dataclass(frozen=True)
class GuestRecipe:
    """The whole guest: its root filesystem and what is added to make it boot and report."""

    rootfs: RootfsRecipe = field(default_factory=RootfsRecipe)
    init_script: str = INIT_SCRIPT
    grub_cfg: str = GRUB_CFG
    grub_modules: tuple[str, ...] = GRUB_MODULES
    fstab: str = FSTAB
    hostname: str = HOSTNAME
    disk_mib: int = DISK_MIB
    mkfs_options: tuple[str, ...] = MKFS_OPTIONS

    def key(self) -> str:
        return _digest({**asdict(self), "rootfs": self.rootfs.key()})

    def added_files(self) -> dict[str, tuple[str, int]]:
        """Guest path → (content, mode) of the files added to the root filesystem."""
        return {
            INIT_PATH: (self.init_script, 0o755),
            "/boot/grub/grub.cfg": (self.grub_cfg, 0o644),
            "/etc/fstab": (self.fstab, 0o644),
            "/etc/hostname": (self.hostname, 0o644),
        }


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for the suite's main archive (not security,
    not updates), from deb822 `.sources` files or `sources.list`; Debian's CDN otherwise."""
    candidates: list[tuple[str, list[str]]] = []
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", _read(path)):
            fields = dict(
                (name.strip().lower(), value.strip())
                for name, _, value in (
                    line.partition(":") for line in stanza.splitlines() if ":" in line
                )
                if not name.startswith("#")
            )
            if "deb" in fields.get("types", "").split():
                for uri in fields.get("uris", "").split():
                    candidates.append((uri, fields.get("suites", "").split()))
    for line in _read(sources / "sources.list").splitlines():
        words = line.split("#", 1)[0].split()
        options = [w for w in words[1:] if not w.startswith("[")] if words else []
        if words and words[0] == "deb" and len(options) >= 2:
            candidates.append((options[0], [options[1]]))
    for uri, suites in candidates:
        if SUITE in suites and uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
