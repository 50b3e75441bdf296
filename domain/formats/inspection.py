"""Image inspection before qemu-img follows anything in the file.

The bytes are read by oslo.utils' format inspector (the one Nova, Glance and Cinder use), which
detects the real format and runs its safety checks: no qcow2 backing file or external data file,
no unknown qcow2 feature, no VMDK other than a self-contained sparse one. This module adds what
imgprep needs on top: a VMDK must carry its own sparse header (a bare descriptor file names its
extents in other files), a file that starts with a known magic but does not parse is a truncated
header, not raw data, and a declared format must be the detected one. Only after that does
qemu-img see the file, always with the detected format pinned, and `verify_info` checks what it
reports against what the bytes said.

Every refusal is an ImageRefused whose message is the reason, written for a person.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from oslo_utils.imageutils import format_inspector

from domain.core.errors import ImageRefused

if TYPE_CHECKING:
    from domain.formats.qemu_img import ImageInfo

# Inspector names that are a raw disk to qemu: a partition table is raw bytes, not a format.
RAW_NAMES = frozenset({"raw", "gpt", "mbr"})
SUPPORTED = ("raw", "qcow2", "vmdk")
SELF_CONTAINED_VMDK = ("monolithicsparse", "streamoptimized")

QCOW2_MAGIC = b"QFI\xfb"  # the first bytes of every qcow2 image

# Where image formats put their magic. A file that starts with one of these but that the
# inspector could not parse is a damaged or truncated image, never raw data.
MAGICS: tuple[tuple[str, int, bytes], ...] = (
    ("qcow2", 0, QCOW2_MAGIC),
    ("vmdk", 0, b"KDMV"),
    ("vmdk", 0, b"# Disk DescriptorFile"),
    ("qed", 0, b"QED\x00"),
    ("vhdx", 0, b"vhdxfile"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("vdi", 64, b"\x7f\x10\xda\xbe"),
)


@dataclass(frozen=True)
class Inspection:
    """What the bytes say the image is."""

    format: str  # raw, qcow2 or vmdk
    virtual_size: int  # from the header; for raw, the file size
    detail: str  # the inspector's own name (gpt, mbr, raw, qcow2, vmdk)


def inspect_image(path: Path, declared: str = "auto") -> Inspection:
    """Detect the format of `path` and refuse it unless it is safe to open as that format.

    Refused, with ImageRefused naming the reason: an unrecognisable or truncated header, a
    failed safety check (backing file, data file, unknown features, VMDK extents), an
    unsupported format, or a declared format other than the detected one.
    """
    inspector = _detect(path)
    name = str(inspector.NAME)
    detected = "raw" if name in RAW_NAMES else name
    if detected == "raw":
        _refuse_damaged_magic(path)
    if declared not in ("auto", detected):
        if detected == "raw":
            raise ImageRefused(
                f"it was declared {declared} but its bytes are not a {declared} image "
                "(no known image header: raw data)"
            )
        raise ImageRefused(f"it was declared {declared} but its bytes are in {detected} format")
    if detected not in SUPPORTED:
        raise ImageRefused(
            f"its format {detected} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    if detected == "vmdk" and not inspector.has_region("header"):
        create_type = getattr(inspector, "vmdktype", "unknown")
        raise ImageRefused(
            f"the vmdk image is a bare descriptor file (createType {create_type}) whose extents "
            "are other files; only self-contained monolithicSparse or streamOptimized images "
            "are accepted"
        )
    _safety_check(path, inspector, detected)
    virtual_size = path.stat().st_size if detected == "raw" else int(inspector.virtual_size)
    return Inspection(format=detected, virtual_size=virtual_size, detail=name)


def detected_format(path: Path) -> str | None:
    """What the bytes look like (raw for partition tables), or None when that cannot be told;
    no verdict: for reports about refused images."""
    try:
        inspector = _detect(path)
    except ImageRefused:
        return None
    name = str(inspector.NAME)
    return "raw" if name in RAW_NAMES else name


def verify_info(info: ImageInfo, inspected: Inspection) -> None:
    """Check what `qemu-img info` (format pinned) reports against what the bytes said."""
    if info.format != inspected.format:
        raise ImageRefused(
            f"qemu-img reads it as {info.format}, the inspector as {inspected.format}"
        )
    if info.backing_filename or info.full_backing_filename:
        raise ImageRefused(
            f"qemu-img reports a backing file ({info.backing_filename!r}) the inspector did not see"
        )
    if info.data_file:
        raise ImageRefused(
            f"qemu-img reports an external data file ({info.data_file!r}) the inspector did not see"
        )
    if inspected.format == "qcow2" and info.virtual_size != inspected.virtual_size:
        raise ImageRefused(
            f"qemu-img reports a virtual size of {info.virtual_size} bytes, the header says "
            f"{inspected.virtual_size}"
        )


def _detect(path: Path) -> format_inspector.FileInspector:
    try:
        inspector = format_inspector.detect_file_format(str(path))
    except format_inspector.ImageFormatError as error:
        raise ImageRefused(f"its format cannot be determined: {error}") from None
    except OSError as error:
        raise ImageRefused(f"it cannot be read: {error.strerror}") from None
    except Exception as error:  # the inspector parses hostile bytes; any failure is a refusal
        raise ImageRefused(
            f"its header cannot be parsed ({type(error).__name__}: {error})"
        ) from None
    if inspector is None:
        raise ImageRefused("its format cannot be determined")
    return inspector


def _refuse_damaged_magic(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(512)
    for fmt, offset, magic in MAGICS:
        if head[offset : offset + len(magic)] == magic:
            raise ImageRefused(
                f"it starts like a {fmt} image but its header is truncated or malformed"
            )


def _safety_check(path: Path, inspector: format_inspector.FileInspector, detected: str) -> None:
    try:
        inspector.safety_check()
    except format_inspector.SafetyCheckFailed as error:
        failures = {str(check): str(reason) for check, reason in error.failures.items()}
        raise ImageRefused(_explain(path, detected, failures)) from None
    except format_inspector.ImageFormatError as error:
        raise ImageRefused(f"the {detected} image cannot be checked: {error}") from None
    except Exception as error:  # hostile bytes again: never let a parser bug pass an image
        raise ImageRefused(
            f"the {detected} image cannot be checked ({type(error).__name__}: {error})"
        ) from None


def _explain(path: Path, detected: str, failures: dict[str, str]) -> str:
    """One sentence per failed check, the most telling first."""
    reasons = []
    if "backing_file" in failures:
        name = qcow2_backing_name(path)
        shown = f" ({name!r})" if name else ""
        reasons.append(
            f"the qcow2 image names a backing file{shown}; images must be self-contained"
        )
    if "data_file" in failures:
        reasons.append("the qcow2 image names an external data file; images must be self-contained")
    if "unknown_features" in failures:
        reasons.append(
            f"the qcow2 image uses features imgprep does not know ({failures['unknown_features']})"
        )
    if "descriptor" in failures:
        reasons.append(
            f"the vmdk descriptor is refused ({failures['descriptor']}); only self-contained "
            "monolithicSparse or streamOptimized images without extent paths are accepted"
        )
    known = {"backing_file", "data_file", "unknown_features", "descriptor"}
    reasons += [
        f"the {detected} image failed the {check} check ({reason})"
        for check, reason in failures.items()
        if check not in known
    ]
    return "; ".join(reasons)


def qcow2_backing_name(path: Path) -> str | None:
    """The backing file name a qcow2 header names, read without qemu-img (for messages)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(20)
            offset, size = struct.unpack(">QI", header[8:20])
            if not 0 < size <= 1023 or offset > 2**21:
                return None
            handle.seek(offset)
            return handle.read(size).decode("utf-8", "replace")
    except (OSError, struct.error):
        return None
