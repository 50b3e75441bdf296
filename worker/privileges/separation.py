"""Privilege separation at start: the helper as root, then everything else as `privileges.user`.

`imgprep worker` started as root with `privileges.helper_socket` set starts the privileged
helper (`python -m helper`, which dies with the worker), waits until it answers, hands the
cache, instances, state and snapshots directories to the workers' user, and drops to that user
for good (supplementary groups, gid, uid: the kernel clears every capability; no_new_privs, so
no set-user-id program can give any back). A worker that cannot reach its helper says so at
start; its device steps then fail with `HelperUnavailable` (retried).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import structlog

from domain.core.errors import HelperUnavailable
from worker.privileges.helper_client import HelperClient
from worker.settings import Settings

log = structlog.get_logger(__name__)

PR_SET_NO_NEW_PRIVS = 38
HELPER_START_SECONDS = 30.0


def helper_argv(settings: Settings, *, die_with_parent: bool = False) -> list[str]:
    """The helper's command line for these settings (its roots come from here, not callers)."""
    privileges = settings.privileges
    argv = [
        sys.executable,
        "-m",
        "helper",
        "--socket",
        privileges.helper_socket,
        "--cache-dir",
        str(settings.cache_dir),
        "--instances-dir",
        str(settings.instances_dir),
        "--state-dir",
        str(settings.state_dir),
        "--helper-state-dir",
        str(privileges.helper_state_dir),
        "--devices-dir",
        str(settings.devices_dir),
        "--user",
        privileges.user or "root",
    ]
    for fstype in settings.mount.allowed_filesystems:
        argv += ["--allowed-filesystem", fstype]
    return [*argv, "--die-with-parent"] if die_with_parent else argv


def start_helper(settings: Settings) -> subprocess.Popen[bytes]:
    """Start the helper as a child of this (root) process and wait until it answers."""
    process = subprocess.Popen(
        helper_argv(settings, die_with_parent=True), stdin=subprocess.DEVNULL, cwd="/"
    )
    client = HelperClient(Path(settings.privileges.helper_socket))
    deadline = time.monotonic() + HELPER_START_SECONDS
    while True:
        try:
            client.ping()
            return process
        except HelperUnavailable:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def drop_to(user: str, settings: Settings) -> None:
    """Give the work directories to `user` and become it, with no way back. The device work
    areas are not among them: they live in the helper's tree (Settings.devices_dir)."""
    entry = pwd.getpwnam(user)
    state = settings.state_dir
    for path in (settings.cache_dir, settings.instances_dir, state, settings.snapshots_dir):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    become(entry)


def become(entry: pwd.struct_passwd) -> None:
    """Be `entry`'s user for good: no supplementary groups, its gid and uid (the kernel clears
    every capability), and no_new_privs, so no set-user-id program gives any back."""
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = entry.pw_name
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def leave_root(settings: Settings) -> None:
    """What every command but `worker`, `helper` and `demo` (which separate themselves) does
    first: started as root with `privileges.user` set, it becomes that user. Beat, Flower and
    the commands that talk to Redis or parse image files need no privilege, so none of them
    keeps any (a file only root can read is then refused, as it would be in a worker)."""
    user = settings.privileges.user
    if os.geteuid() == 0 and user:
        become(pwd.getpwnam(user))


class HelperWatch:
    """Stops this worker when the helper it started exits: the worker, now unprivileged, cannot
    start a root helper again, so both end and the supervisor starts them again (systemd's
    Restart=, compose's restart:, bench.chaos), and the new worker's janitor releases what the
    operations of the old one held."""

    def __init__(self, helper: subprocess.Popen[bytes]) -> None:
        self.helper = helper
        self.exited = False
        self._pidfd = os.pidfd_open(helper.pid)
        threading.Thread(target=self._wait, name="helper-watch", daemon=True).start()

    def _wait(self) -> None:
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        poller.poll()
        self.exited = True
        log.error("privileged_helper_exited", pid=self.helper.pid, action="worker stops")
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown


def separate(settings: Settings) -> HelperWatch | None:
    """What `imgprep worker` does before Celery starts (nothing with the default settings)."""
    privileges = settings.privileges
    watch = None
    if os.geteuid() == 0 and privileges.helper_socket and privileges.start_helper:
        watch = HelperWatch(start_helper(settings))
        log.info("helper_started_by_worker", socket=privileges.helper_socket)
    if os.geteuid() == 0 and privileges.user:
        drop_to(privileges.user, settings)
        log.info("privileges_dropped", user=privileges.user, uid=os.getuid())
    if privileges.helper_socket:
        check_helper(settings)
    return watch


def check_helper(settings: Settings) -> bool:
    """Say at start whether the helper answers; device steps fail while it does not. A helper
    that serves other directories than this worker's would refuse every device step: the
    worker stops at once, naming them (a configuration error, not an outage)."""
    socket = settings.privileges.helper_socket
    try:
        served = HelperClient(Path(socket)).ping()
    except HelperUnavailable as error:
        log.error("privileged_helper_unreachable", error=str(error))
        return False
    ours = {
        "cache_dir": settings.cache_dir,
        "instances_dir": settings.instances_dir,
        "state_dir": settings.state_dir,
        "devices_dir": settings.devices_dir,
    }
    differ = {
        name: (served[name], os.path.realpath(path))
        for name, path in ours.items()
        if name in served and served[name] != os.path.realpath(path)
    }
    if differ:
        log.error("privileged_helper_serves_other_directories", socket=socket, differ=differ)
        details = "; ".join(
            f"{name}: the helper's {theirs}, this worker's {mine}"
            for name, (theirs, mine) in differ.items()
        )
        raise SystemExit(
            f"imgprep worker: the privileged helper on {socket} serves other directories than "
            f"this worker ({details}); give both the same settings (privileges.helper_state_dir "
            "holds the devices directory)"
        )
    return True
