"""How imgprep names things in a Ceph cluster, and the locations it hands out.

* An imported image is `<images_pool>/<key>` (the cache key: sha1 of the image id, as Nova
  names `_base` files) with the protected snapshot `snap` (Glance's name for it).
* An instance disk is `<pool>/<instance>_<disk>`, as Nova's `Rbd` backend names it.
* A temporary is `<name>.part.<fence>`: imgprep builds every image under such a name and renames
  it into place last (an rbd rename never replaces an image), so a final name always holds a
  complete image; the next holder of the lease removes every holder's temporaries.
"""

from __future__ import annotations

import re

from domain.cache.directory import cache_key
from domain.core.urls import RBD_LOCATION

SNAPSHOT = "snap"
PART = "part"


def image_name(image_id: str) -> str:
    """The name of an image imported into the images pool."""
    return cache_key(image_id)


def disk_image(instance_id: str, disk_name: str) -> str:
    """The name of an instance disk in the instances' pool (Nova's `<uuid>_<disk>`)."""
    return f"{instance_id}_{disk_name}"


def temporary(name: str, fence: int) -> str:
    return f"{name}.{PART}.{fence}"


def temporaries_of(name: str, names: list[str]) -> list[str]:
    """Every holder's temporaries of `name` among `names`."""
    pattern = re.compile(re.escape(name) + rf"\.{PART}\.[0-9]+")
    return [found for found in names if pattern.fullmatch(found)]


def is_temporary(name: str) -> bool:
    return re.search(rf"\.{PART}\.[0-9]+$", name) is not None


def location(fsid: str, pool: str, image: str, snapshot: str = SNAPSHOT) -> str:
    """Glance's location of an image's snapshot: rbd://<fsid>/<pool>/<image>/<snapshot>."""
    return f"rbd://{fsid}/{pool}/{image}/{snapshot}"


def parse_location(url: str) -> tuple[str, str, str, str] | None:
    """(fsid, pool, image, snapshot) of an rbd:// location; None for any other URL."""
    match = RBD_LOCATION.fullmatch(url)
    if match is None:
        return None
    return match["fsid"].lower(), match["pool"], match["image"], match["snapshot"]


def disk_path(pool: str, image: str) -> str:
    """How a disk is shown (InstanceDisk.path): qemu's and Nova's `rbd:<pool>/<image>`."""
    return f"rbd:{pool}/{image}"
