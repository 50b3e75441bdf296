"""The error taxonomy: one root, two behaviours.

Tasks retry `TransientError` with backoff and jitter; every other error fails the step at
once. Each error takes one argument, its message, so that it survives Celery's JSON
serialization (`exc_type`, `exc_module`, `exc_message`) and is rebuilt as the same class by a
Python client; a client in another language reads `exc_type` and the message.
"""

from __future__ import annotations


class ImgprepError(Exception):
    """Root of every error this project raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TransientError(ImgprepError):
    """Worth retrying: network, broker, a busy lock, no free device."""


class PermanentError(ImgprepError):
    """Retrying cannot help: a refused image, a checksum mismatch, a size too small."""


# --- transient -------------------------------------------------------------------------------


class SourceUnavailable(TransientError):
    """The image source did not answer, timed out, or answered 5xx/429."""


class SourceTooSlow(SourceUnavailable):
    """The image source sent less than the minimum rate over the rate window (stalled)."""


class CoordinationUnavailable(TransientError):
    """Redis (locks, journals, device records) could not be reached."""


class LockBusy(TransientError):
    """Another holder kept the lock past this step's wait."""


class LockLost(TransientError):
    """This holder's lease expired or was taken over; it must not publish."""


class NoFreeDevice(TransientError):
    """No loop device or export could be allocated within the wait."""


class CommandTimedOut(TransientError):
    """An external command ran past its wall-clock timeout."""


class DiskBusy(TransientError):
    """Another operation holds the devices and mounts of this instance disk."""


class DeviceBusy(TransientError):
    """A mount or device could not be released yet (still in use); teardown retries."""


class HelperUnavailable(TransientError):
    """The privileged helper (privileges.helper_socket) does not answer; device steps retry."""


class CephUnavailable(TransientError):
    """The Ceph cluster (rbd.conf) did not answer: no monitor reachable, an operation timed out."""


class RbdImageBusy(TransientError):
    """An RBD image is still open by a client (a guest, an export), or has clones."""


# --- permanent -------------------------------------------------------------------------------


class HostUnavailable(PermanentError):
    """The request names a host that no live imgprep worker serves (never seen, or silent)."""


class InvalidRequest(PermanentError):
    """The request does not validate: a field is missing, malformed or out of range."""


class SourceNotAllowed(PermanentError):
    """The image URL (or a redirect) uses a scheme, a file path or a network address that the
    configured allow-lists refuse."""


class SourceNotFound(PermanentError):
    """The image source answered that the image does not exist or may not be read (4xx)."""


class SourceRefused(PermanentError):
    """The image source refused the download: another 4xx, a TLS failure, too many redirects."""


class ChecksumMismatch(PermanentError):
    """The downloaded bytes do not have the checksum the request named."""


class ImageTooLarge(PermanentError):
    """The download exceeds the configured maximum image size."""


class ImageRefused(PermanentError):
    """Image inspection refused the image: unsafe, malformed or not the declared format."""


class DiskTooSmall(PermanentError):
    """The base image's virtual size exceeds the requested disk size."""


class DiskNotFound(PermanentError):
    """The instance disk an operation names does not exist, or imgprep has no record of it."""


class DiskConflict(PermanentError):
    """An instance disk already exists at the target path with other properties."""


class ImageInUse(PermanentError):
    """Another process (a running guest) holds the image's write lock."""


class DiskFull(PermanentError):
    """A filesystem ran out of space while writing an image."""


class CommandFailed(PermanentError):
    """An external command exited with an error."""


class StepTimedOut(PermanentError):
    """A step ran past its time limit (IMGPREP_STEP_TIME_LIMIT) and was stopped."""


class DeviceError(PermanentError):
    """Mapping, mounting or partition handling failed for a reason retrying cannot fix."""


class PartitionTableInvalid(DeviceError):
    """The guest disk's partition table is malformed: an entry past the end, overlapping, empty."""


class PartitionNotFound(DeviceError):
    """The requested partition is not on the guest disk."""


class FilesystemRefused(DeviceError):
    """The guest filesystem is unknown, not allowed, or cannot be mounted safely on this host."""


class FilesystemNeedsRecovery(FilesystemRefused):
    """The guest's ext3/4 journal needs recovery: the guest was not shut down cleanly."""


class InjectionRefused(PermanentError):
    """A file to inject would land outside the guest filesystem or is not allowed."""


class BaseImageMissing(PermanentError):
    """The cached base an instance disk needs is no longer in the cache (removed meanwhile)."""


class CephConfigInvalid(PermanentError):
    """The Ceph settings (rbd.*) cannot work: no ceph.conf, no keyring, a refused key, no pool."""


class RbdSourceRefused(PermanentError):
    """An `rbd://` image source that imgprep will not clone: another cluster, not raw, missing."""


class PrivilegeRefused(PermanentError):
    """The privileged helper refused a request: a path outside the roots, a device it did not
    attach, an operation it does not know, or a caller it does not serve."""
