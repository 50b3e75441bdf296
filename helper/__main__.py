"""`python -m helper`: run the privileged helper (as root).

Everything it may touch comes from its own command line, never from a caller: `imgprep worker`
(started as root) passes the worker's settings when it starts the helper, and a systemd unit or
compose service passes them itself (`imgprep helper` builds the same command line from the
settings).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import pwd
import select
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import structlog

from domain.guest.tools.fuse_as_user import install_handoff
from helper import capabilities
from helper.checks import Refused, Roots, check_root_tree
from helper.logs import configure_logging
from helper.operations import CAPABILITIES
from helper.server import HelperConfig, serve, start_zygote
from helper.zygote import EXIT_ZYGOTE_EXITED, ZygoteExited

log = structlog.get_logger(__name__)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="imgprep-helper", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--instances-dir", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--helper-state-dir", type=Path, required=True)
    parser.add_argument(
        "--devices-dir",
        type=Path,
        help="the device work areas, a tree only root may change "
        "(default: HELPER_STATE_DIR/devices)",
    )
    parser.add_argument("--user", required=True, help="the workers' user: served, owns the socket")
    parser.add_argument("--allowed-filesystem", action="append", default=[])
    parser.add_argument("--die-with-parent", action="store_true")
    return parser.parse_args(argv)


def watch_parent() -> None:
    """Stop when the process that started this one ends. PR_SET_PDEATHSIG cannot do it here:
    the worker that started the helper drops to an unprivileged user, and the kernel checks
    that user's right to signal root when it sends the parent-death signal (it has none)."""
    parent = os.pidfd_open(os.getppid())

    def wait() -> None:
        poller = select.poll()
        poller.register(parent, select.POLLIN)
        poller.poll()
        log.info("helper_parent_exited")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="parent-watch", daemon=True).start()


def needed_capabilities() -> set[int]:
    """What the helper must hold: every operation's capabilities, and CAP_SETPCAP to drop the
    others from each operation's bounding set."""
    return {cap for caps in CAPABILITIES.values() for cap in caps} | {capabilities.CAP_SETPCAP}


def prepare_devices_dir(path: Path) -> None:
    """Create the devices directory (root, 0755: the worker reads the FUSE exports in it) and
    refuse it unless only root can change it and every directory above it."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    check_root_tree(Path(os.path.realpath(path)))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    configure_logging()
    if os.geteuid() != 0:
        print("imgprep-helper must run as root", file=sys.stderr)
        return 1
    missing = capabilities.missing(needed_capabilities())
    if missing:
        print(
            f"imgprep-helper lacks {', '.join(missing)}, which its operations need (with "
            "CAP_SETPCAP to drop the rest for each): give the service these capabilities "
            "(deploy/systemd/imgprep-helper.service, CapabilityBoundingSet=)",
            file=sys.stderr,
        )
        return 1
    # However it was started (by a root worker, by systemd), it keeps no more than that: what
    # the unit's CapabilityBoundingSet gives it, so its server and zygote hold the same
    capabilities.limit_to(needed_capabilities())
    user = pwd.getpwnam(args.user)
    devices_dir = args.devices_dir or args.helper_state_dir / "devices"
    try:
        prepare_devices_dir(devices_dir)
    except (Refused, OSError) as error:
        print(f"imgprep-helper will not start: {error}", file=sys.stderr)
        return 1
    # the FUSE daemons run as the workers' user and reach their mount through this script,
    # root's, in root's state directory (which that user may search, not change)
    args.helper_state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    handoff = install_handoff(args.helper_state_dir)
    config = HelperConfig(
        socket_path=args.socket,
        roots=Roots.of(
            args.cache_dir,
            args.instances_dir,
            args.state_dir,
            tuple(args.allowed_filesystem),
            devices_dir,
        ),
        state_dir=args.helper_state_dir,
        allowed_uids=frozenset({0, user.pw_uid}),
        socket_gid=user.pw_gid,
        worker=(user.pw_uid, user.pw_gid) if user.pw_uid != 0 else None,
        handoff=handoff,
    )
    zygote = start_zygote(config)  # before any thread: it is forked
    if args.die_with_parent:
        watch_parent()

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(SystemExit, KeyboardInterrupt):
        try:
            serve(config, zygote, user=args.user, group=grp.getgrgid(user.pw_gid).gr_name)
        except ZygoteExited as error:
            log.error("helper_zygote_exited", reason=str(error), action="helper stops")
            return EXIT_ZYGOTE_EXITED
    return 0


def run() -> int:
    """main(); an OSError out of it (its socket: a live helper serves it, SocketInUse, or it
    cannot be bound) is one line naming the socket and exit status 1, not a traceback."""
    try:
        return main()
    except OSError as error:
        log.error("helper_start_failed", error=str(error))
        where = f" {error.filename}" if error.filename else ""
        print(f"imgprep-helper: cannot serve{where}: {error.strerror or error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(run())
