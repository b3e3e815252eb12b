"""blkback's backing store: a RAW image file, opened and checked once, then read and written
by offset.

Owns: `open_image` (every check a bad command line deserves a one-line error for, including
the format: a VHD, qcow2, vmdk, VHDX or xz file is refused with the command that makes it
RAW, judged by xentools.core.diskformat as `xentools image inspect` judges it),
`ImageFile` (the descriptor, size and sector size; vectored reads and writes that either
move every byte or raise, and their non-blocking attempts; flush; hole punching), and
`ImageError`.
Must not: know about rings, grants or blkif requests; callers have already checked that
every extent lies inside the image.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shlex
import stat
from collections.abc import Sequence

from xentools.core.diskformat import identify, raw_refusal
from xentools.core.errors import XentoolsError

__all__ = ["IOV_MAX", "ImageError", "ImageFile", "open_image"]

SECTOR_SIZE = 512
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.restype = ctypes.c_int
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class ImageError(XentoolsError):
    """The image cannot be served: missing, unreadable, not a multiple of the sector size,
    or read-only while write access was asked. The message is one line naming the rule."""


class ImageFile:
    """An open image. `size` is in bytes; `read_only` says how it was opened."""

    def __init__(self, path: str, fd: int, size: int, read_only: bool, sector_size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.read_only = read_only
        self.sector_size = sector_size
        self._punch_ok: bool | None = None
        self._nowait_ok = hasattr(os, "RWF_NOWAIT")

    # -- data -------------------------------------------------------------------------------

    def readv(self, buffers: Sequence[memoryview], offset: int, total: int = -1) -> None:
        """Fill `buffers` from `offset`; OSError on failure or a short read (the image shrank).
        `total`, when known, is the buffers' combined length (saves summing them)."""
        self._vectored(os.preadv, buffers, offset, total)

    def writev(self, buffers: Sequence[memoryview], offset: int, total: int = -1) -> None:
        """Write `buffers` at `offset`; OSError on failure or a short write."""
        self._vectored(os.pwritev, buffers, offset, total)

    def try_readv(self, buffers: Sequence[memoryview], offset: int, total: int) -> bool:
        """Fill `buffers` from `offset` unless the kernel says that would wait for the disk
        (preadv2 RWF_NOWAIT: the data is not in the page cache): then False, and some bytes
        may have been read (call readv for all of them, e.g. on another thread). Where the
        kernel or filesystem cannot tell, the read is simply done (waiting) and True
        returned. OSError for a real failure."""
        return self._nowait(os.preadv, buffers, offset, total)

    def try_writev(self, buffers: Sequence[memoryview], offset: int, total: int) -> bool:
        """Write `buffers` unless that would wait (pwritev2 RWF_NOWAIT); False as try_readv
        (rewriting the same bytes with writev is then harmless)."""
        return self._nowait(os.pwritev, buffers, offset, total)

    def _nowait(self, call, buffers: Sequence[memoryview], offset: int, total: int) -> bool:  # type: ignore[no-untyped-def]
        if self._nowait_ok and len(buffers) <= IOV_MAX:
            try:
                done = call(self.fd, buffers, offset, os.RWF_NOWAIT)
            except BlockingIOError:
                return False
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                self._nowait_ok = False  # this kernel or filesystem cannot say: just wait
            else:
                return done == total
        self._vectored(call, buffers, offset, total)
        return True

    def _vectored(self, call, buffers: Sequence[memoryview], offset: int, total: int = -1) -> None:  # type: ignore[no-untyped-def]
        fd = self.fd
        if total >= 0 and len(buffers) <= IOV_MAX:
            done = call(fd, buffers, offset)  # the common case: one system call
            if done == total:
                return
            buffers = _skip(buffers, done)
            offset += done
            if done == 0:
                raise OSError(errno.EIO, f"short transfer at offset {offset} of {self.path}")
        start = 0
        count = len(buffers)
        while start < count:
            batch = list(buffers[start : start + IOV_MAX])
            want = sum(b.nbytes for b in batch)
            done = call(fd, batch, offset)
            offset += done
            if done == want:
                start += len(batch)
                continue
            if done == 0:
                raise OSError(errno.EIO, f"short transfer at offset {offset} of {self.path}")
            # Partial transfer: skip what was moved and go on with the rest.
            buffers = _skip(batch, done) + list(buffers[start + len(batch) :])
            start, count = 0, len(buffers)

    def flush(self) -> None:
        """Make every completed write durable (FLUSH_DISKCACHE, WRITE_BARRIER)."""
        os.fdatasync(self.fd)

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset + length) keeping the size (DISCARD): it reads back as
        zeroes. OSError(EOPNOTSUPP) where the filesystem cannot punch holes."""
        if length == 0:
            return
        if _fallocate is None:
            raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"punching a hole in {self.path}: {os.strerror(err)}")

    def can_punch_holes(self) -> bool:
        """True if the filesystem supports FALLOC_FL_PUNCH_HOLE (probed past the end of the
        image, where punching changes nothing)."""
        if self._punch_ok is None:
            if self.read_only or _fallocate is None:
                self._punch_ok = False
            else:
                self._punch_ok = (
                    _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self.size, 4096) == 0
                )
        return self._punch_ok

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _skip(buffers: Sequence[memoryview], done: int) -> list[memoryview]:
    """The buffers left after the first `done` bytes were transferred."""
    rest: list[memoryview] = []
    for buf in buffers:
        if done >= buf.nbytes:
            done -= buf.nbytes
            continue
        rest.append(buf[done:] if done else buf)
        done = 0
    return rest


def open_image(path: str, *, read_only: bool = False, sector_size: int = SECTOR_SIZE) -> ImageFile:
    """Open a RAW image for serving. Raises ImageError with one of the rules:
    image.sector_size (not a power of two in 512..4096), image.missing, image.not_a_file,
    image.unreadable, image.read_only (write access asked for a file marked read-only or on
    a read-only filesystem), image.empty, image.not_raw (VHD, qcow2, vmdk, VHDX, xz: with the
    command that converts it), image.size (not a multiple of the sector size: with the
    command that pads it)."""
    if not isinstance(sector_size, int) or sector_size < 512 or sector_size > 4096 or sector_size & (sector_size - 1):
        raise ImageError("image.sector_size", f"sector size {sector_size} is not a power of two in 512..4096")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError("image.missing", f"{path}: no such file") from None
    except OSError as err:
        raise ImageError("image.unreadable", f"{path}: {err.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError("image.not_a_file", f"{path}: not a regular file or block device")
    if not read_only and not (st.st_mode & 0o222):
        # root may open a 0444 file for writing anyway; the mode says nobody should.
        raise ImageError("image.read_only", f"{path}: the file is read-only; serve it with --read-only")
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        try:
            # Serving reads leaves the access time alone, as Linux's blkback does (and saves
            # the check on every read); only the file's owner or root may ask.
            fd = os.open(path, flags | os.O_NOATIME)
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            fd = os.open(path, flags)
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES) and not read_only and os.access(path, os.R_OK):
            raise ImageError(
                "image.read_only", f"{path}: cannot open for writing ({err.strerror}); serve it with --read-only"
            ) from None
        raise ImageError("image.unreadable", f"{path}: {err.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        # One read proves the file is readable (a FUSE file or a device may still refuse).
        os.pread(fd, 1, 0)
    except OSError as err:
        os.close(fd)
        raise ImageError("image.unreadable", f"{path}: {err.strerror}") from None
    if size == 0:
        os.close(fd)
        raise ImageError("image.empty", f"{path}: the image is empty")
    try:
        _require_raw(fd, path, size)
    except BaseException:
        os.close(fd)
        raise
    if size % sector_size:
        os.close(fd)
        raise ImageError(
            "image.size",
            f"{path}: size {size} is not a multiple of the sector size {sector_size};"
            f" pad it with zeroes: truncate -s %{sector_size} {shlex.quote(path)}",
        )
    return ImageFile(path, fd, size, read_only, sector_size)


def _require_raw(fd: int, path: str, size: int) -> None:
    """ImageError "image.not_raw" when the file is another format than RAW."""

    def read_at(offset: int, length: int) -> bytes:
        if offset >= size or length <= 0:
            return b""
        return os.pread(fd, min(length, size - offset), offset)

    try:
        refusal = raw_refusal(identify(read_at, size, path))
    except OSError as err:
        raise ImageError("image.unreadable", f"{path}: {err.strerror}") from None
    if refusal is not None and refusal[0] == "image.not_raw":  # the size is judged above
        raise ImageError(*refusal)
