"""Writing files under a guest root: links never lead out of it, with openat2 and without.

The guest root here is a plain directory: path resolution is the same on any filesystem, so
the mounted-guest tests (tests/integration/test_injection.py) need not repeat every case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.core.errors import InjectionRefused
from domain.core.models import FileInjection
from domain.guest.injection import GuestRoot, have_openat2, write_file
from tests.conftest import unable

WALKS = [
    pytest.param(True, id="openat2"),
    pytest.param(False, id="no-link-walk"),
]


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    return root


@pytest.fixture
def host(tmp_path: Path) -> Path:
    folder = tmp_path / "host"
    folder.mkdir()
    return folder


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(autouse=True)
def _kernel_has_openat2() -> None:
    if not have_openat2():
        unable("the kernel has no openat2 (Linux < 5.6)")


@pytest.mark.root  # injected files are made root's (fchown to 0)
@pytest.mark.parametrize("use_openat2", WALKS)
def test_writes_content_and_mode_creating_parents(guest: Path, use_openat2: bool) -> None:
    with GuestRoot(guest, use_openat2=use_openat2) as root:
        written = write_file(root, FileInjection(path="/a/b/c/file", content="hi", mode=0o600))
    target = guest / "a/b/c/file"
    assert target.read_bytes() == b"hi"
    assert target.stat().st_mode & 0o7777 == 0o600
    assert (guest / "a/b").stat().st_mode & 0o777 == 0o755
    assert (written.size, written.mode) == (2, 0o600)
    assert everything_under(guest) == ["a", "a/b", "a/b/c", "a/b/c/file", "etc"]


@pytest.mark.root  # injected files are made root's (fchown to 0)
@pytest.mark.parametrize("use_openat2", WALKS)
def test_a_link_as_last_component_is_replaced_not_followed(
    guest: Path, host: Path, use_openat2: bool
) -> None:
    (host / "passwd").write_text("host secret\n")
    (guest / "etc/motd").symlink_to(host / "passwd")
    with GuestRoot(guest, use_openat2=use_openat2) as root:
        write_file(root, FileInjection(path="/etc/motd", content="guest\n"))
    assert (host / "passwd").read_text() == "host secret\n"
    assert not (guest / "etc/motd").is_symlink()
    assert (guest / "etc/motd").read_text() == "guest\n"


@pytest.mark.root  # injected files are made root's (fchown to 0)
def test_absolute_and_parent_links_resolve_inside_the_guest(guest: Path, host: Path) -> None:
    # Given links a naive join would follow to the host folder
    (guest / "etc/abs").symlink_to(host)
    (guest / "etc/up").symlink_to("/".join([".."] * 20))
    (guest / str(host).lstrip("/")).mkdir(parents=True)
    # When files are written through them
    with GuestRoot(guest, use_openat2=True) as root:
        write_file(root, FileInjection(path="/etc/abs/one", content="1"))
        write_file(root, FileInjection(path=f"/etc/up{host}/two", content="2"))
    # Then the host folder is untouched and the files are where the guest would put them
    assert everything_under(host) == []
    inside = guest / str(host).lstrip("/")
    assert sorted(p.name for p in inside.iterdir()) == ["one", "two"]


def test_a_link_to_nothing_in_the_guest_is_refused(guest: Path, host: Path) -> None:
    (guest / "etc/abs").symlink_to(host)  # the guest has no such directory
    with (
        GuestRoot(guest, use_openat2=True) as root,
        pytest.raises(InjectionRefused, match="does not exist"),
    ):
        write_file(root, FileInjection(path="/etc/abs/one", content="1"))
    assert everything_under(host) == []


def test_without_openat2_any_link_on_the_way_is_refused(guest: Path, host: Path) -> None:
    (guest / "etc/abs").symlink_to(host)
    (guest / "etc/up").symlink_to("../..")
    for path in ("/etc/abs/one", "/etc/up/two"):
        with (
            GuestRoot(guest, use_openat2=False) as root,
            pytest.raises(InjectionRefused, match="link"),
        ):
            write_file(root, FileInjection(path=path, content="x"))
    assert everything_under(host) == []


def test_the_guest_root_itself_may_not_be_a_link(tmp_path: Path, host: Path) -> None:
    (tmp_path / "root").symlink_to(host)
    with pytest.raises(OSError, match=r"Too many levels of symbolic links|Not a directory"):
        GuestRoot(tmp_path / "root")


@pytest.mark.root  # injected files are made root's (fchown to 0)
def test_a_directory_in_the_way_is_refused_and_leaves_no_temporary(guest: Path) -> None:
    (guest / "etc/motd").mkdir()
    with GuestRoot(guest) as root, pytest.raises(IsADirectoryError):
        write_file(root, FileInjection(path="/etc/motd", content="x"))
    assert sorted(p.name for p in (guest / "etc").iterdir()) == ["motd"]
