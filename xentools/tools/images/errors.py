"""Exceptions of the guest image tools (catalog, fetch, inspect, boot test).

Owns: the narrow exception types raised on bad input or a failed step, each carrying a
short stable `rule` id; `str(err)` is one line, "<rule>: <detail>".
Must not: import anything else from xentools.tools.images (every module here imports this).
"""

from __future__ import annotations

from xentools.core.errors import XentoolsError


class GuestImageError(XentoolsError):
    """Base class: a step of the guest image tools failed for a reason the user can act on.
    (Not devices.blkback_image.ImageError, which is about a disk file a backend serves.)"""


class CatalogError(GuestImageError):
    """The catalog file is malformed, or names no image for the request (unknown release,
    architecture or file system; no matching name in the release's checksum file)."""


class MirrorError(GuestImageError):
    """The mirror could not be read: unreachable, file missing, or a download stopped early
    (the partial file is kept for resume)."""


class ChecksumError(GuestImageError):
    """A checksum file is malformed, or a downloaded file does not match its digest."""


class StorageError(GuestImageError):
    """A file could not be written locally (disk full, permission, another fetch holds it)."""


class ImageFormatError(GuestImageError):
    """An image is not in the format a step needs (not RAW, truncated, bad xz stream)."""


class BootTestError(GuestImageError):
    """The boot test could not run the guest: xl missing, not root, xl failed, bad option."""
