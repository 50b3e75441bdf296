"""Privilege separation for the demo, tests and benchmarks: the workers' user, directories it can
reach, the settings of a separated cluster, and a helper run on its own."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from domain.core.errors import HelperUnavailable
from harness.machine import release_everything_under
from worker.privileges.helper_client import HelperClient

WORKER_USER = "imgprep"


def unprivileged_user(name: str = WORKER_USER) -> pwd.struct_passwd:
    """The workers' user, created (a system user without a shell, as scripts/install.sh
    does) if this machine has none."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/var/lib/imgprep",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
        )
        return pwd.getpwnam(name)


@contextlib.contextmanager
def open_directory(prefix: str) -> Iterator[Path]:
    """A fresh directory (0755) under /tmp that the workers' user can reach; removed after.
    Whatever is still mounted, attached or running under it then is released, and fails the
    block that leaked it (an rmtree would skip a mounted directory and leave the mount)."""
    path = Path(tempfile.mkdtemp(prefix=f"imgprep-{prefix}-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        released = release_everything_under(path)
        shutil.rmtree(path, ignore_errors=True)
    assert not released, f"left behind under {path}: {released}"


def socket_directory(parent: Path | None = None, prefix: str = "imgprep-h") -> Path:
    """A fresh directory (0755) with a short path for helper sockets: a Unix socket's path is
    limited to 108 bytes, which the directories of tests and campaigns exceed. Made under /run
    (or /tmp) unless `parent` is given; the caller removes it."""
    if parent is None:
        parent = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


def privileged_overrides(
    root: Path, user: str = WORKER_USER, sockets: Path | None = None
) -> dict[str, str]:
    """Settings of a cluster whose workers start their helper and run as `user`; the helper's
    socket is in `sockets` if given (see socket_directory), else under `root`."""
    return {
        "IMGPREP_PRIVILEGES__HELPER_SOCKET": str((sockets or root / "run") / "helper.sock"),
        "IMGPREP_PRIVILEGES__USER": user,
        "IMGPREP_PRIVILEGES__HELPER_STATE_DIR": str(root / "run" / "helper-state"),
    }


@dataclass
class HelperProcess:
    """A helper started on its own (`python -m helper`), stopped by the pid we started."""

    process: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path
    devices_dir: Path  # the work areas' tree (root's own)

    @classmethod
    def start(
        cls,
        root: Path,
        user: str = WORKER_USER,
        *,
        socket_path: Path | None = None,
        helper_state_dir: Path | None = None,
        prefix: Sequence[str] = (),
    ) -> HelperProcess:
        """A helper for the directories of `root`; `helper_state_dir` (default `root/hs`) must
        be its workers' (their work areas are in its devices/); `prefix` runs before it (e.g.
        `setpriv` with a service's capability bounding set)."""
        for sub in ("cache", "instances", "state"):
            (root / sub).mkdir(exist_ok=True)
        socket_path = socket_path or root / "run" / "helper.sock"
        log_path = root / "helper.log"
        argv = [*prefix, sys.executable, "-m", "helper", "--socket", str(socket_path)]
        argv += ["--cache-dir", str(root / "cache"), "--instances-dir", str(root / "instances")]
        helper_state_dir = helper_state_dir or root / "hs"
        argv += ["--state-dir", str(root / "state"), "--helper-state-dir", str(helper_state_dir)]
        argv += ["--user", user, "--allowed-filesystem", "ext4"]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        made = cls(process, socket_path, log_path, helper_state_dir / "devices")
        made.wait_ready()
        return made

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                HelperClient(self.socket_path).ping()
                return
            except HelperUnavailable:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> HelperProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
