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
import logging
import os
import pwd
import signal
import sys
from pathlib import Path
from types import FrameType

import structlog

from helper import capabilities
from helper.checks import Roots
from helper.server import HelperConfig, serve


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="imgprep-helper", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--instances-dir", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--helper-state-dir", type=Path, required=True)
    parser.add_argument("--user", required=True, help="the workers' user: served, owns the socket")
    parser.add_argument("--allowed-filesystem", action="append", default=[])
    parser.add_argument("--die-with-parent", action="store_true")
    return parser.parse_args(argv)


def configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    configure_logging()
    if os.geteuid() != 0:
        print("imgprep-helper must run as root", file=sys.stderr)
        return 1
    if args.die_with_parent:
        capabilities.die_with_parent(signal.SIGTERM)
    user = pwd.getpwnam(args.user)
    config = HelperConfig(
        socket_path=args.socket,
        roots=Roots.of(
            args.cache_dir, args.instances_dir, args.state_dir, tuple(args.allowed_filesystem)
        ),
        state_dir=args.helper_state_dir,
        allowed_uids=frozenset({0, user.pw_uid}),
        socket_gid=user.pw_gid,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(SystemExit, KeyboardInterrupt):
        serve(config, user=args.user, group=grp.getgrgid(user.pw_gid).gr_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
