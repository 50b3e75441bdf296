"""Queue names: the shared queue every worker consumes, and one queue per host.

A canvas sends its host-local steps (the instance disk, its devices, its snapshot) to the queue of
the host that holds the disk; everything else goes to the shared queue. Queue names are part of
the wire contract (README, "Wire contract").
"""

from __future__ import annotations

DEFAULT_QUEUE = "imgprep"
HOST_QUEUE_PREFIX = "imgprep.host."


def host_queue(host: str) -> str:
    """The queue a host's workers consume besides the default one."""
    return f"{HOST_QUEUE_PREFIX}{host}"
