"""The names a qcow2 header makes qemu open: read from an already opened descriptor.

A qcow2 file can name other files inside itself: a backing file (its name at
`backing_file_offset`) and an external data file (incompatible feature bit 2, its name in header
extension 0x44415441). qemu opens what they name unless every node is given explicitly, and an
external data file cannot be pinned away (qemu refuses `data-file` for an image without one).
Before a tool that runs with more rights than the file's owner opens such a file, the owner
could have written any name there.

`references` parses just enough of the header (QEMU's docs/interop/qcow2.txt) to say what it
names; `refuse_references` turns any such name into an ImageRefused (a backing file name is
allowed where the caller pins the backing node itself: qemu then never opens it). This is a
check on bytes read once from one descriptor: a caller that cannot stop the owner from
rewriting the header afterwards must also run the tool with no more rights than the owner
(domain.guest.tools.fuse_as_user), which is what makes it safe; the check is what turns the
attempt into a typed refusal with a reason.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from domain.core.errors import ImageRefused

MAGIC = b"QFI\xfb"
EXTERNAL_DATA_FILE = 1 << 2  # incompatible feature bit 2
KNOWN_INCOMPATIBLE = 0b11111  # dirty, corrupt, external data file, compression type, extended L2
DATA_FILE_EXTENSION = 0x44415441  # "DATA": the external data file's name
END_OF_EXTENSIONS = 0
V2_HEADER_LENGTH = 72
HEAD_BYTES = 65536  # a cluster at least: the header and its extensions fit in the first one


@dataclass(frozen=True)
class Qcow2References:
    """What a qcow2 header names outside itself."""

    backing_file: str | None
    data_file: str | None
    external_data_file: bool  # the feature bit, whether or not its name is there
    unknown_incompatible: int  # incompatible feature bits qemu may not know to refuse

    @property
    def any(self) -> bool:
        return bool(
            self.backing_file
            or self.data_file
            or self.external_data_file
            or self.unknown_incompatible
        )


def is_qcow2(head: bytes) -> bool:
    return head[:4] == MAGIC


def references(head: bytes) -> Qcow2References:
    """Parse the header at the start of `head` (ImageRefused when it is cut short or odd)."""
    if len(head) < V2_HEADER_LENGTH or not is_qcow2(head):
        raise ImageRefused("it is not a qcow2 image (no complete qcow2 header)")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    incompatible = 0
    header_length = V2_HEADER_LENGTH
    if version >= 3:
        if len(head) < 104:
            raise ImageRefused("its qcow2 version 3 header is cut short")
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        (header_length,) = struct.unpack_from(">I", head, 100)
    elif version != 2:
        raise ImageRefused(f"its qcow2 version {version} is unknown")
    backing_file = None
    if backing_offset:
        end = backing_offset + backing_size
        if backing_size > 1023 or end > len(head):
            raise ImageRefused("its backing file name lies outside its first cluster")
        backing_file = head[backing_offset:end].decode("utf-8", "replace")
    return Qcow2References(
        backing_file=backing_file,
        data_file=_data_file_name(head, header_length),
        external_data_file=bool(incompatible & EXTERNAL_DATA_FILE),
        unknown_incompatible=incompatible & ~KNOWN_INCOMPATIBLE,
    )


def read_head(fd: int) -> bytes:
    """The first bytes of the open file `fd` (its position is left unchanged)."""
    return os.pread(fd, HEAD_BYTES, 0)


def refuse_references(head: bytes, what: str, *, backing_pinned: bool = False) -> None:
    """ImageRefused unless the qcow2 header in `head` names no other file (a backing file, an
    external data file) and uses no incompatible feature unknown to imgprep. `backing_pinned`:
    the caller gives qemu the backing node itself (or none), so a backing file name in the
    header is never opened and is allowed. `what` names the image in the message."""
    found = references(head)
    reasons = []
    if found.backing_file and not backing_pinned:
        reasons.append(f"a backing file ({found.backing_file!r})")
    if found.external_data_file or found.data_file:
        reasons.append(f"an external data file ({found.data_file or 'no name'!r})")
    if found.unknown_incompatible:
        reasons.append(f"unknown incompatible features (0x{found.unknown_incompatible:x})")
    if reasons:
        raise ImageRefused(f"{what} names {' and '.join(reasons)} in its qcow2 header: refused")


def _data_file_name(head: bytes, offset: int) -> str | None:
    """The external data file's name among the header extensions from `offset`, if any."""
    position = offset
    while position + 8 <= len(head):
        kind, length = struct.unpack_from(">II", head, position)
        if kind == END_OF_EXTENSIONS:
            return None
        start = position + 8
        if start + length > len(head):
            raise ImageRefused("its qcow2 header extensions run past its first cluster")
        if kind == DATA_FILE_EXTENSION:
            return head[start : start + length].decode("utf-8", "replace")
        position = start + (length + 7) // 8 * 8
    raise ImageRefused("its qcow2 header extensions have no end marker in its first cluster")
