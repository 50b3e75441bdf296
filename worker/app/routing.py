"""Queue names: the shared queue every worker consumes, and one queue per host.

A canvas sends its host-local steps (the instance disk, its devices, its snapshot) to the queue of
the host that holds the disk; everything else goes to the shared queue, but for the fetch in host
scope (image_cache.scope), where each host fills its own cache. Queue names are part of
the wire contract (README, "Wire contract").
"""

from __future__ import annotations

DEFAULT_QUEUE = "imgprep"
HOST_QUEUE_PREFIX = "imgprep.host."


def host_queue(host: str) -> str:
    """The queue a host's workers consume besides the default one."""
    return f"{HOST_QUEUE_PREFIX}{host}"


def fetch_queue(scope: str, host: str) -> str:
    """Where a canvas fetches its image: any worker of the shared cache (shared scope), or the
    host that will hold the disk, whose own cache it fills (host scope)."""
    return host_queue(host) if scope == "host" else DEFAULT_QUEUE
