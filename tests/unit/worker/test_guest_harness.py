"""The boot harness's pure parts: reading the guest's report off its console, the recipe's
digests, the mirror found in apt's sources, and the qemu arguments that keep a guest offline."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from worker.cli.demo.guest_boot import (
    BootDisk,
    GuestBootFailed,
    machine_arguments,
    parse_report,
)
from worker.cli.demo.guest_recipe import (
    AUTHORIZED_KEYS_PATH,
    DEFAULT_MIRROR,
    MESSAGE_PATH,
    GuestRecipe,
    RootfsRecipe,
    debian_mirror,
)

KEYS = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIexample test@imgprep\n"
HELLO = base64.b64encode(b"hello\n").decode()
KEYS_BASE64 = base64.b64encode(KEYS).decode()
CONSOLE = f"""\
SeaBIOS noise
[    1.234] Linux version 6.1.0 ...
imgprep-guest: booted 6.1.0-50-cloud-amd64 boot 0d5c1f3e-1111-2222-3333-444455556666 uptime 12.08
imgprep-guest: disk vda 2147483648
imgprep-guest: file {MESSAGE_PATH} mode 644 owner 0:0 size 6 base64 {HELLO}
imgprep-guest: file {AUTHORIZED_KEYS_PATH} mode 600 owner 0:0 size {len(KEYS)} base64 {KEYS_BASE64}
imgprep-guest: says hello
imgprep-guest: earlier 7e6d5c4b-aaaa-bbbb-cccc-ddddeeeeffff
imgprep-guest: recorded 0d5c1f3e-1111-2222-3333-444455556666
[   12.5] EXT4-fs (vda1): re-mounted. Quota mode: none.
imgprep-guest: root read-only
imgprep-guest: done uptime 12.56\r
[   12.6] reboot: Power down
"""


def test_a_complete_report_is_parsed() -> None:
    report = parse_report(CONSOLE)
    assert report.kernel == "6.1.0-50-cloud-amd64"
    assert report.boot_id == "0d5c1f3e-1111-2222-3333-444455556666"
    assert (report.booted_uptime, report.done_uptime) == (12.08, 12.56)
    assert report.disks == {"vda": 2 * 2**30}
    assert report.text(MESSAGE_PATH) == "hello\n"
    keys = report.files[AUTHORIZED_KEYS_PATH]
    assert (keys.content, keys.mode, keys.uid, keys.gid) == (KEYS, 0o600, 0, 0)
    assert report.earlier_boots == ("7e6d5c4b-aaaa-bbbb-cccc-ddddeeeeffff",)
    assert report.missing == ()
    assert report.clean
    assert report.lines[0].startswith("imgprep-guest: booted")
    assert report.lines[-1] == "imgprep-guest: done uptime 12.56"


def test_missing_and_empty_files_are_told_apart() -> None:
    console = CONSOLE.replace(
        f"imgprep-guest: file {MESSAGE_PATH} mode 644 owner 0:0 size 6 base64 aGVsbG8K",
        f"imgprep-guest: file {MESSAGE_PATH} mode 640 owner 0:0 size 0 base64 ",
    ).replace(
        next(line for line in CONSOLE.splitlines() if AUTHORIZED_KEYS_PATH in line),
        f"imgprep-guest: missing {AUTHORIZED_KEYS_PATH}",
    )
    report = parse_report(console)
    assert report.files[MESSAGE_PATH].content == b""
    assert report.files[MESSAGE_PATH].mode == 0o640
    assert report.missing == (AUTHORIZED_KEYS_PATH,)
    assert AUTHORIZED_KEYS_PATH not in report.files


@pytest.mark.parametrize(
    ("cut_after", "reason"),
    [
        ("[    1.234]", "never reported that it booted"),
        ("imgprep-guest: says hello", "stopped before it finished its report"),
    ],
)
def test_an_unfinished_report_fails_with_the_console_tail(cut_after: str, reason: str) -> None:
    console = CONSOLE[: CONSOLE.index(cut_after) + len(cut_after)]
    with pytest.raises(GuestBootFailed, match=reason) as failure:
        parse_report(console)
    assert console.splitlines()[-1] in str(failure.value)


def test_an_empty_console_says_so() -> None:
    with pytest.raises(GuestBootFailed, match="its console is empty"):
        parse_report("")


def test_the_machine_has_no_network_and_never_reboots() -> None:
    for accel in ("tcg", "kvm"):
        argv = machine_arguments(accel)
        assert argv[argv.index("-nic") + 1] == "none"
        assert "-nodefaults" in argv and "-no-reboot" in argv
        assert not any(a.startswith(("-netdev", "-net")) and a != "-nic" for a in argv)
    assert machine_arguments("tcg")[:4] == ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]
    assert machine_arguments("kvm")[:4] == ["-accel", "kvm", "-cpu", "host"]


def test_boot_disks_name_files_and_protocols() -> None:
    assert BootDisk.file("/var/a,b/disk", "qcow2").argument() == (
        "file=/var/a,,b/disk,format=qcow2,if=none,id=boot-disk"
    )
    rbd = BootDisk("rbd:vms/disk-1:conf=/etc/ceph/ceph.conf", "raw")
    assert rbd.argument().startswith("file=rbd:vms/disk-1:conf=/etc/ceph/ceph.conf,format=raw,")


def test_a_recipe_change_is_a_new_key_and_only_the_rootfs_part_changes_the_rootfs() -> None:
    recipe = GuestRecipe()
    same = GuestRecipe()
    other_init = GuestRecipe(init_script=recipe.init_script + "# changed\n")
    other_mirror = GuestRecipe(rootfs=RootfsRecipe(mirror="http://mirror.example/debian"))
    assert recipe.key() == same.key()
    assert other_init.key() != recipe.key()
    assert other_init.rootfs.key() == recipe.rootfs.key()
    assert other_mirror.key() != recipe.key()
    assert other_mirror.rootfs.key() != recipe.rootfs.key()


def test_the_mirror_is_the_one_apt_uses_for_the_main_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_a_one_line_sources_list_works_and_nothing_falls_back_to_the_cdn(tmp_path: Path) -> None:
    assert debian_mirror(tmp_path) == DEFAULT_MIRROR
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64] http://local.example/debian bookworm main contrib\n"
    )
    assert debian_mirror(tmp_path) == "http://local.example/debian"
