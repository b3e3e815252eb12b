"""Grant sharing and mapping for the software Xen (the client side of grantd).

Owns: SoftwareGrantSharer (gntshr: pages in this process's own memfd, granted through grantd)
and SoftwareGrantMapper (gnttab: maps another domain's granted pages into this process,
contiguously, with mmap at fixed addresses; grant copy through grantd).
Must not: keep grant tables (grantd does), or let a read-only grant be mapped writable.

Memory: a GrantSharer owns one memfd; share() takes a run of pages of it, zeroed, mapped
contiguously in this process. grantd passes that memfd (read-only when the map is read-only)
to a mapper, which maps each granted page where it belongs in one contiguous region: an
anonymous PROT_NONE reservation, then MAP_FIXED|MAP_SHARED per run of adjacent pages. Pages
freed by unshare are punched out of the memfd (released, and zero when reused).
Using a `buf` after unshare/unmap is a use-after-unmap and may crash the process, as with
gntalloc/gntdev mappings.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap as _mmap_consts
import os
import threading
from bisect import insort
from collections.abc import Sequence
from dataclasses import dataclass

from xentools.platform.interface import (
    PAGE_SIZE,
    GrantError,
    GrantMapper,
    GrantSharer,
    GrantStillMapped,
    MappedPages,
    PlatformError,
    SharedPages,
)
from xentools.platform.sim.grantd_wire import (
    DOMID_FIRST_RESERVED,
    GRANT_REF_MAX,
    MAX_COPY_BYTES,
    MAX_COPY_SEGMENTS,
    MAX_MAP_REFS,
    MAX_SHARE_PAGES,
    Kind,
    Op,
    ServiceConnection,
)

# ---------------------------------------------------------------------------------------------
# mmap at fixed addresses through libc (Python's mmap module cannot place a mapping)
# ---------------------------------------------------------------------------------------------

PROT_NONE = _mmap_consts.PROT_NONE if hasattr(_mmap_consts, "PROT_NONE") else 0
PROT_READ = _mmap_consts.PROT_READ
PROT_WRITE = _mmap_consts.PROT_WRITE
MAP_SHARED = _mmap_consts.MAP_SHARED
MAP_PRIVATE = _mmap_consts.MAP_PRIVATE
MAP_ANONYMOUS = _mmap_consts.MAP_ANONYMOUS
MAP_FIXED = 0x10  # the same value on every Linux architecture
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = getattr(_libc, "mmap64", _libc.mmap)
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.restype = ctypes.c_int
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _check_mmap(addr: int | None, what: str) -> int:
    if addr is None or addr == _MAP_FAILED:
        e = ctypes.get_errno()
        raise PlatformError(f"grant.mmap: {what} failed: {os.strerror(e)}")
    return addr


class PageMapping:
    """Runs of pages of memfds mapped contiguously at `addr`; owns that range until unmap().

    `runs` lists (fd, first page in the file, number of pages) in the order they appear.
    """

    def __init__(self, runs: Sequence[tuple[int, int, int]], writable: bool) -> None:
        npages = sum(n for _, _, n in runs)
        if npages <= 0:
            raise GrantError("grant.count: nothing to map")
        self.length = npages * PAGE_SIZE
        prot = PROT_READ | PROT_WRITE if writable else PROT_READ
        if len(runs) == 1:
            fd, page, n = runs[0]
            self.addr = _check_mmap(
                _mmap(None, self.length, prot, MAP_SHARED, fd, page * PAGE_SIZE), "mmap"
            )
        else:
            # Reserve the whole range first so the runs land next to each other and nobody
            # else's mapping can slip in between.
            self.addr = _check_mmap(
                _mmap(None, self.length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                "reserving address space",
            )
            pos = self.addr
            try:
                for fd, page, n in runs:
                    got = _mmap(pos, n * PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, fd, page * PAGE_SIZE)
                    _check_mmap(got, "mmap at a fixed address")
                    pos += n * PAGE_SIZE
            except BaseException:
                _munmap(self.addr, self.length)
                raise
        array = (ctypes.c_char * self.length).from_address(self.addr)
        self._base = memoryview(array).cast("B")
        self.view = self._base if writable else self._base.toreadonly()

    def unmap(self) -> None:
        if self.addr == 0:
            return
        for mv in (self.view, self._base):
            try:
                mv.release()
            except BufferError:
                pass  # someone still exports it; after munmap that is their use-after-unmap
        _munmap(self.addr, self.length)
        self.addr = 0


def coalesce_runs(pages: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Turn (key, page) per granted page into (key, first page, count) runs of adjacent pages."""
    runs: list[list[int]] = []
    for key, page in pages:
        if runs and runs[-1][0] == key and runs[-1][1] + runs[-1][2] == page:
            runs[-1][2] += 1
        else:
            runs.append([key, page, 1])
    return [(k, p, n) for k, p, n in runs]


def _check_domid(domid: int) -> None:
    if not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
        raise GrantError(f"grant.bad_domid: {domid!r} is not a domain id")


# ---------------------------------------------------------------------------------------------
# Granting side
# ---------------------------------------------------------------------------------------------


class SoftwareSharedPages(SharedPages):
    """Pages of this domain's memfd granted to `domid`."""

    def __init__(
        self, owner: SoftwareGrantSharer, domid: int, refs: tuple[int, ...], writable: bool,
        first_page: int, mapping: PageMapping,
    ) -> None:
        self.domid = domid
        self.refs = refs
        self.writable = writable
        self._owner = owner
        self._first_page = first_page
        self._mapping: PageMapping | None = mapping

    @property
    def buf(self) -> memoryview:
        if self._mapping is None:
            raise GrantError("grant.unshared: these pages were unshared")
        return self._mapping.view

    def __repr__(self) -> str:
        return f"SoftwareSharedPages(domid={self.domid}, refs={self.refs}, writable={self.writable})"


class SoftwareGrantSharer(GrantSharer):
    """A gntshr handle: one memfd, one connection to grantd acting as `domid`."""

    def __init__(self, socket_path: str, domid: int) -> None:
        self.domid = domid
        self._lock = threading.Lock()
        self._memfd = os.memfd_create("xentools-gntshr", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            # A peer holding the memfd read-write (a writable map) must not be able to shrink
            # it: our own mappings of the pages beyond the new end would die with SIGBUS.
            fcntl.fcntl(self._memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            self._conn = ServiceConnection(socket_path, Kind.GNTSHR, domid, fds=[self._memfd])
        except BaseException:
            os.close(self._memfd)
            raise
        self._file_pages = 0
        self._free: list[tuple[int, int]] = []  # sorted (first page, count) runs of the memfd
        self._shared: dict[int, SoftwareSharedPages] = {}
        self.leaked_pages = 0  # pages kept forever because a peer still mapped them (XSA-396)

    # -- page allocator ------------------------------------------------------------------

    def _alloc_run(self, count: int) -> tuple[int, bool]:
        """First fit among freed runs, else grow the memfd. Returns (first page, reused)."""
        for i, (first, n) in enumerate(self._free):
            if n >= count:
                if n == count:
                    del self._free[i]
                else:
                    self._free[i] = (first + count, n - count)
                return first, True
        first = self._file_pages
        os.ftruncate(self._memfd, (first + count) * PAGE_SIZE)
        self._file_pages += count
        return first, False

    def _free_run(self, first: int, count: int) -> None:
        # Give the memory back; a punched range reads as zeroes when it is reused.
        if _fallocate is not None:
            _fallocate(
                self._memfd,
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                first * PAGE_SIZE,
                count * PAGE_SIZE,
            )
        insort(self._free, (first, count))
        merged: list[tuple[int, int]] = []
        for f, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == f:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((f, n))
        self._free = merged

    # -- GrantSharer ---------------------------------------------------------------------

    def share(self, domid: int, count: int, writable: bool = True) -> SoftwareSharedPages:
        _check_domid(domid)
        if not isinstance(count, int) or not 1 <= count <= MAX_SHARE_PAGES:
            raise GrantError(f"grant.count: cannot share {count!r} pages (1..{MAX_SHARE_PAGES})")
        with self._lock:
            if self._conn.closed:
                raise GrantError("grant.closed: this gntshr handle is closed")
            first, reused = self._alloc_run(count)
            try:
                mapping = PageMapping([(self._memfd, first, count)], writable=True)
            except BaseException:
                self._free_run(first, count)
                raise
            if reused:
                # Punched pages are already zero; this also covers a filesystem that refused
                # the punch, so a reused page never shows a previous share's bytes.
                ctypes.memset(mapping.addr, 0, mapping.length)
            try:
                reply, _ = self._conn.request(
                    Op.SHARE, (domid, int(writable), *range(first, first + count))
                )
            except BaseException:
                mapping.unmap()
                self._free_run(first, count)
                raise
            pages = SoftwareSharedPages(self, domid, tuple(reply.ints), writable, first, mapping)
            self._shared[id(pages)] = pages
            return pages

    def _own(self, pages: SharedPages) -> SoftwareSharedPages:
        if not isinstance(pages, SoftwareSharedPages) or self._shared.get(id(pages)) is not pages:
            raise GrantError("grant.not_shared: these pages are not shared by this handle")
        return pages

    def unshare(self, pages: SharedPages) -> None:
        with self._lock:
            p = self._own(pages)
            del self._shared[id(p)]
            mapping, p._mapping = p._mapping, None
            assert mapping is not None
            mapping.unmap()
            try:
                self._conn.request(Op.UNSHARE, p.refs)
            except GrantStillMapped:
                # XSA-396: the peer can still write these pages; never hand them out again.
                self.leaked_pages += len(p.refs)
                raise
            self._free_run(p._first_page, len(p.refs))

    def is_mapped(self, pages: SharedPages) -> bool:
        with self._lock:
            p = self._own(pages)
            reply, _ = self._conn.request(Op.IS_MAPPED, p.refs)
            return bool(reply.ints[0])

    def close(self) -> None:
        """Revoke every grant of this handle. Grants a peer still maps are revoked by grantd
        when unmapped; the peer's mapping stays valid memory until then."""
        with self._lock:
            if self._conn.closed:
                return
            self._conn.close()
            for p in self._shared.values():
                if p._mapping is not None:
                    p._mapping.unmap()
                    p._mapping = None
            self._shared.clear()
            os.close(self._memfd)
            self._memfd = -1

    def __enter__(self) -> SoftwareGrantSharer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Mapping side
# ---------------------------------------------------------------------------------------------


class SoftwareMappedPages(MappedPages):
    """Pages of domain `domid` mapped here, contiguous in `buf`."""

    def __init__(
        self, domid: int, refs: tuple[int, ...], writable: bool, map_id: int,
        mapping: PageMapping,
    ) -> None:
        self.domid = domid
        self.refs = refs
        self.writable = writable
        self.map_id = map_id
        self._mapping: PageMapping | None = mapping

    @property
    def buf(self) -> memoryview:
        if self._mapping is None:
            raise GrantError("grant.unmapped: these pages were unmapped")
        return self._mapping.view

    @property
    def address(self) -> int:
        """Start address of the mapping in this process (for tests and ctypes users)."""
        if self._mapping is None:
            raise GrantError("grant.unmapped: these pages were unmapped")
        return self._mapping.addr

    def __repr__(self) -> str:
        return f"SoftwareMappedPages(domid={self.domid}, refs={self.refs}, writable={self.writable})"


@dataclass(frozen=True)
class GrantCopy:
    """One segment of a grant copy (xengnttab_grant_copy_segment_t).

    With `to_grant` True, `local` (any bytes-like) is copied into the granted page at
    `offset`; otherwise len(local) bytes of the granted page at `offset` are copied into
    `local` (a writable buffer). offset + len(local) must stay within the page.
    """

    domid: int
    ref: int
    offset: int
    local: bytes | bytearray | memoryview
    to_grant: bool


class SoftwareGrantMapper(GrantMapper):
    """A gnttab handle: one connection to grantd acting as `domid`."""

    def __init__(self, socket_path: str, domid: int) -> None:
        self.domid = domid
        self._lock = threading.Lock()
        self._conn = ServiceConnection(socket_path, Kind.GNTTAB, domid)
        self._maps: dict[int, SoftwareMappedPages] = {}

    def map(self, domid: int, refs: Sequence[int], writable: bool) -> SoftwareMappedPages:
        _check_domid(domid)
        refs = tuple(refs)
        if not 1 <= len(refs) <= MAX_MAP_REFS:
            raise GrantError(f"grant.count: cannot map {len(refs)} refs (1..{MAX_MAP_REFS})")
        for ref in refs:
            if not isinstance(ref, int) or not 0 <= ref <= GRANT_REF_MAX:
                raise GrantError(f"grant.bad_ref: {ref!r} is not a grant ref")
        with self._lock:
            if self._conn.closed:
                raise GrantError("grant.closed: this gnttab handle is closed")
            reply, fds = self._conn.request(Op.MAP, (domid, int(writable), *refs))
            try:
                map_id, nfiles, *where = reply.ints
                if (
                    nfiles != len(fds)
                    or len(where) != 2 * len(refs)
                    or not all(0 <= i < nfiles for i in where[::2])
                ):
                    raise PlatformError("grantd.bad_reply: MAP reply does not match its request")
                pages = [(fds[where[2 * i]], where[2 * i + 1]) for i in range(len(refs))]
                try:
                    mapping = PageMapping(coalesce_runs(pages), writable)
                except BaseException:
                    self._conn.request(Op.UNMAP, (map_id,))
                    raise
            finally:
                for fd in fds:
                    os.close(fd)  # the mapping keeps the memory; the descriptors are not needed
            mapped = SoftwareMappedPages(domid, refs, writable, map_id, mapping)
            self._maps[map_id] = mapped
            return mapped

    def unmap(self, pages: MappedPages) -> None:
        with self._lock:
            if (
                not isinstance(pages, SoftwareMappedPages)
                or self._maps.get(pages.map_id) is not pages
            ):
                raise GrantError("grant.not_mapped: these pages are not mapped by this handle")
            del self._maps[pages.map_id]
            mapping, pages._mapping = pages._mapping, None
            assert mapping is not None
            # Unmap here first: once grantd counts the map down the granter may reuse the pages.
            mapping.unmap()
            self._conn.request(Op.UNMAP, (pages.map_id,))

    def copy(self, segments: Sequence[GrantCopy]) -> None:
        """Copy between local buffers and granted pages (xengnttab_grant_copy), all segments
        in one round trip. Raises GrantError (and copies nothing) if any segment is invalid."""
        if len(segments) > MAX_COPY_SEGMENTS:
            raise GrantError(f"grant.copy_count: {len(segments)} segments > {MAX_COPY_SEGMENTS}")
        ints: list[int] = [len(segments)]
        blob = bytearray()
        total = 0
        for seg in segments:
            _check_domid(seg.domid)
            length = memoryview(seg.local).nbytes
            total += length
            ints += (int(seg.to_grant), seg.domid, seg.ref, seg.offset, length)
            if seg.to_grant:
                blob += seg.local
            elif memoryview(seg.local).readonly:
                raise GrantError("grant.copy_readonly: a copy from a grant needs a writable buffer")
        if total > MAX_COPY_BYTES:
            raise GrantError(f"grant.copy_size: {total} bytes > {MAX_COPY_BYTES} in one copy")
        with self._lock:
            if self._conn.closed:
                raise GrantError("grant.closed: this gnttab handle is closed")
            reply, _ = self._conn.request(Op.COPY, ints, bytes(blob))
        pos = 0
        for seg in segments:
            if not seg.to_grant:
                dest = memoryview(seg.local).cast("B")
                dest[:] = reply.blob[pos : pos + dest.nbytes]
                pos += dest.nbytes

    def close(self) -> None:
        """Unmap what is still mapped and release the handle."""
        with self._lock:
            if self._conn.closed:
                return
            for mapped in self._maps.values():
                if mapped._mapping is not None:
                    mapped._mapping.unmap()
                    mapped._mapping = None
            self._maps.clear()
            self._conn.close()  # BYE counts every map of this handle down

    def __enter__(self) -> SoftwareGrantMapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
