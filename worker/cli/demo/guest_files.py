"""Reading one text file out of a guest disk without mounting anything: the demo's proof that an
injected file is really in the instance disk, by tools other than the ones that wrote it.

The disk is converted to a temporary raw copy (qemu-img, format pinned), its partition found
with `sfdisk --json`, and the file read with debugfs at the partition's byte offset.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from domain.core.runner import Runner
from domain.formats.partitions import SECTOR


@dataclass(frozen=True)
class GuestFile:
    content: str
    mode: int


def read_guest_file(
    disk: Path, fmt: str, partition: int | None, guest_path: str, work_dir: Path
) -> GuestFile | None:
    """The file at `guest_path` in `partition` (None: the whole disk), or None if absent."""
    runner = Runner(default_timeout=300)
    with tempfile.TemporaryDirectory(prefix="guestread-", dir=work_dir) as work:
        raw = Path(work) / "disk.raw"
        runner.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(disk), str(raw)])
        offset = 0
        if partition is not None:
            table = json.loads(runner.run(["sfdisk", "--json", str(raw)]).stdout)
            for entry in table["partitiontable"]["partitions"]:
                if re.search(rf"\D{partition}$", entry["node"]):
                    offset = int(entry["start"]) * SECTOR
        source = f"{raw}?offset={offset}"
        stat = runner.run(["debugfs", "-R", f"stat {guest_path}", source], check=False)
        mode = re.search(r"Mode:\s+(\d+)", stat.stdout)
        if mode is None:
            return None
        content = runner.run(["debugfs", "-R", f"cat {guest_path}", source]).stdout
    return GuestFile(content=content, mode=int(mode.group(1), 8))
