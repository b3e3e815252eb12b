"""`xentools image`'s view of an image file: identify it, refuse one that is not RAW.

Owns: `inspect_image` (opens the file and feeds xentools.core.diskformat.identify with its
bytes) and `require_raw` (the refusal, as ImageFormatError, for boot-test). The names of
the format parsers are re-exported from the core, where the parsing lives (blkback uses
the same code to refuse a VHD, so `image inspect`, boot-test and `blkback serve` agree).
Must not: parse formats itself (xentools.core.diskformat does), or write to the image;
only an unreadable file raises ImageFormatError.
"""

from __future__ import annotations

import os

from xentools.core.diskformat import (
    GPT_TYPES,
    MBR_TYPES,
    ImageInfo,
    Partition,
    VhdFooter,
    identify,
    parse_gpt,
    parse_mbr,
    parse_vhd_footer,
    raw_refusal,
)
from xentools.tools.images.errors import ImageFormatError

__all__ = [
    "GPT_TYPES", "ImageInfo", "MBR_TYPES", "Partition", "VhdFooter", "identify", "inspect_image",
    "parse_gpt", "parse_mbr", "parse_vhd_footer", "require_raw",
]


def inspect_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Identify the image at `path`; ImageFormatError when it cannot be read."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if not (os.path.isfile(p)):
                raise ImageFormatError("image.not_file", f"{p} is not a regular file")

            def read_at(offset: int, length: int) -> bytes:
                if offset >= st.st_size or length <= 0:
                    return b""
                return os.pread(f.fileno(), min(length, st.st_size - offset), offset)

            return identify(read_at, st.st_size, p)
    except FileNotFoundError:
        raise ImageFormatError("image.missing", f"{p} does not exist") from None
    except IsADirectoryError:
        raise ImageFormatError("image.not_file", f"{p} is a directory") from None
    except OSError as err:
        raise ImageFormatError("image.unreadable", f"cannot read {p}: {err.strerror or err}") from None


def require_raw(info: ImageInfo) -> None:
    """Refuse an image that cannot be booted as RAW (another format, with the command that
    converts it; an odd size, with the command that pads it)."""
    refusal = raw_refusal(info)
    if refusal is not None:
        raise ImageFormatError(*refusal)
