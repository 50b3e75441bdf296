"""Image inspection before qemu-img follows anything in the file.

The bytes are read by oslo.utils' format inspector (the one Nova, Glance and Cinder use), which
detects the real format and runs its safety checks: no qcow2 backing file or external data file,
no VMDK extent that names another file, no header it cannot parse. Only after that does qemu-img
see the file, and always with the detected format pinned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oslo_utils.imageutils import format_inspector

from tasks.errors import ImageRefused

# Inspector names that are a raw disk to qemu: a partition table is raw bytes, not a format.
RAW_NAMES = frozenset({"raw", "gpt", "mbr"})
SUPPORTED = frozenset({"raw", "qcow2", "vmdk"})


@dataclass(frozen=True)
class Inspection:
    """What the bytes say the image is."""

    format: str  # raw, qcow2 or vmdk
    virtual_size: int  # as the inspector reads it from the header (0 for raw: use the file size)
    detail: str  # the inspector's own name (gpt, mbr, raw, qcow2, vmdk)


def inspect_image(path: Path, declared: str = "auto") -> Inspection:
    """Detect the format of `path` and refuse it unless it is safe to open as that format.

    Refused, with ImageRefused naming the reason: an unrecognisable or truncated header, a
    failed safety check (backing file, data file, extents), an unsupported format, or a
    declared format other than the detected one.
    """
    try:
        inspector = format_inspector.detect_file_format(str(path))
    except format_inspector.ImageFormatError as error:
        raise ImageRefused(f"the image format cannot be determined: {error}") from None
    if inspector is None:
        raise ImageRefused("the image format cannot be determined")
    name = str(inspector.NAME)
    detected = "raw" if name in RAW_NAMES else name
    if declared not in ("auto", detected):
        raise ImageRefused(
            f"the image was declared {declared} but its bytes are {detected}"
            + (f" ({name})" if name != detected else "")
        )
    if detected not in SUPPORTED:
        raise ImageRefused(
            f"image format {detected} is not supported (supported: raw, qcow2, vmdk)"
        )
    try:
        inspector.safety_check()
    except format_inspector.SafetyCheckFailed as error:
        raise ImageRefused(
            f"the {detected} image failed its safety checks: {_reasons(error)}"
        ) from None
    except format_inspector.ImageFormatError as error:
        raise ImageRefused(f"the {detected} image cannot be checked: {error}") from None
    virtual_size = 0 if detected == "raw" else int(inspector.virtual_size)
    return Inspection(format=detected, virtual_size=virtual_size, detail=name)


def _reasons(error: format_inspector.SafetyCheckFailed) -> str:
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"{check}: {reason}" for check, reason in failures.items())
    return str(error)
