"""A free TCP port on loopback, for the servers the demo (and the harness) start.

Not the kernel's pick (bind to port 0): that is an ephemeral port, the range every outgoing
connection on the machine draws its source port from, so between our release of it and the
server's bind a client connecting anywhere may take it ("Address already in use", seen when
several test processes start redis-servers and Ceph monitors at once). The port is drawn at
random below the ephemeral range instead, where only listening servers bind, and checked free.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A port no one listens on at 127.0.0.1, outside the ephemeral range when there is room."""
    highest = _first_ephemeral() - 1
    for _ in range(200):
        port = random.randint(LOWEST, highest) if highest > LOWEST else 0  # noqa: S311 - not secret
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port on 127.0.0.1")


def _first_ephemeral() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default
