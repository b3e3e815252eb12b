"""Real Xen: grants, event channels and xenstore for a process in a Xen domain.

Owns: XenPlatform and its handles, built on Xen's stable C libraries through cffi (the
declarations are in _xenlibs.py, generated from bindings/xenlibs.cdef.h):
  libxengnttab.so.1  xengntshr_* (granting side, Linux gntalloc) and xengnttab_* (mapping
                     side, Linux gntdev; grant copy when the library has the 1.1 symbol)
  libxenevtchn.so.1  xenevtchn_* (Linux evtchn device)
Libraries are opened lazily by versioned soname, so this module imports where they (or
/dev/xen) are absent; using a handle there raises PlatformError with the reason.
Must not: use libxenctrl (its soname changes with every Xen release), know about blkif,
or write its own xenstore client (open_xenstore uses xentools.platform.xenstore).

Every failed C call raises a PlatformError subclass whose message is one line naming the
call and `[Errno N] strerror`, with `.errno` set and the OSError chained as __cause__.
The calls themselves do not block (grant ioctls, a non-blocking event channel fd); waiting
is done by the caller on fileno() with its own timeout, and xenstore takes a timeout.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xentools.platform.barrier import full_barrier
from xentools.platform.interface import (
    PAGE_SIZE,
    EventChannelError,
    EventChannels,
    GrantError,
    GrantMapper,
    GrantSharer,
    MappedPages,
    Platform,
    PlatformError,
    SharedPages,
    XenstoreError,
)
from xentools.platform.xen._xenlibs import ffi

GNTTAB_SONAME = "libxengnttab.so.1"  # Debian package libxengnttab1
EVTCHN_SONAME = "libxenevtchn.so.1"  # Debian package libxenevtchn1
DEV_XEN = Path("/dev/xen")
CAPABILITIES = Path("/proc/xen/capabilities")
DOMID_SELF = 0x7FF0  # xen.h DOMID_SELF, never a real domain

# <xen/grant_table.h> GNTTABOP_error_msgs, indexed by -status.
_GNTST_MESSAGES = (
    "okay", "undefined error", "unrecognised domain id", "unrecognised or inappropriate gntref",
    "unrecognised or inappropriate handle", "inappropriate virtual address to map",
    "inappropriate device address to unmap", "out of space in I/O MMU",
    "not enough privilege for operation", "specified page was invalid for op",
    "copy arguments cross page boundary", "page address size too large",
    "operation not done; try again", "out of space",
)

_libs: dict[str, object] = {}
_libs_lock = threading.Lock()


def _lib(soname: str):
    """dlopen `soname` once per process; PlatformError with the package name if absent."""
    with _libs_lock:
        if soname not in _libs:
            try:
                _libs[soname] = ffi.dlopen(soname)
            except OSError as err:
                package = "libxengnttab1" if "gnttab" in soname else "libxenevtchn1"
                raise PlatformError(
                    f"real Xen: cannot load {soname} (Debian package {package}): {err}"
                ) from err
        return _libs[soname]


def _raise(cls: type[PlatformError], call: str, err: int | None = None, fix: str = "") -> None:
    """Raise `cls` for a failed C call, from ffi.errno (read at once: it is per thread),
    with `fix` (what the user can do about it) appended when given."""
    if err is None:
        err = ffi.errno
    cause = OSError(err, os.strerror(err))
    exc = cls(f"{call}: [Errno {err}] {os.strerror(err)}" + (f"; {fix}" if fix else ""))
    exc.errno = err
    raise exc from cause


# /dev/xen/<node> -> the Linux module that makes it.
DEVICE_MODULES = {"gntdev": "xen-gntdev", "gntalloc": "xen-gntalloc", "evtchn": "xen-evtchn"}


def device_fix(node: str, err: int) -> str:
    """What to do when /dev/xen/<node> could not be opened with errno `err`: load its module
    when it is absent, get access when it is refused (in a domU as in dom0)."""
    path = DEV_XEN / node
    if err == errno.ENOENT or not path.exists():
        return f"{path} is absent: load its driver with `modprobe {DEVICE_MODULES[node]}` (as root)"
    if err in (errno.EACCES, errno.EPERM):
        return f"no access to {path}: run as root, or give this user read-write access to it (a udev rule)"
    return ""


def _open_failed(cls: type[PlatformError], call: str, node: str) -> None:
    err = ffi.errno
    _raise(cls, f"{call} ({DEV_XEN / node})", err, device_fix(node, err))


def _check_count(count: int) -> None:
    if not isinstance(count, int) or count < 1:
        raise GrantError(f"grant page count must be a positive int, got {count!r}")


def _check_domid(domid: int) -> None:
    if not isinstance(domid, int) or not 0 <= domid < DOMID_SELF:
        raise GrantError(f"domid must be an int in [0, {DOMID_SELF:#x}), got {domid!r}")


class _Pages:
    """Common part of shared and mapped pages: one address, one master view, released once."""

    def __init__(self, domid: int, refs: Sequence[int], writable: bool, addr, view_writable: bool) -> None:
        self.domid = domid
        self.refs = tuple(refs)
        self.writable = writable
        self._addr = addr
        view = memoryview(ffi.buffer(addr, PAGE_SIZE * len(self.refs)))
        self._view: memoryview | None = view if view_writable else view.toreadonly()

    @property
    def buf(self) -> memoryview:
        if self._view is None:
            raise GrantError(f"pages of domain {self.domid} refs {self.refs[:4]}... are released")
        return self._view

    def _release_view(self, what: str) -> None:
        """Invalidate `buf` before the memory goes away. Slices taken from buf stay usable
        in Python but point at unmapped memory: callers must not keep them past this."""
        if self._view is None:
            raise GrantError(f"{what}: pages already released")
        try:
            self._view.release()
        except BufferError as err:  # e.g. an ffi.from_buffer() of buf is still alive
            raise GrantError(f"{what}: buf is still exported ({err}); drop those references first") from err
        self._view = None


class XenSharedPages(_Pages, SharedPages):
    """Pages this process granted with xengntshr_share_pages (kernel gntalloc). `writable`
    is what the peer may do; our own view is always writable."""

    def __init__(self, domid: int, refs: Sequence[int], writable: bool, addr) -> None:
        super().__init__(domid, refs, writable, addr, view_writable=True)


class XenMappedPages(_Pages, MappedPages):
    """Pages of another domain mapped with xengnttab_map_domain_grant_refs (kernel gntdev).
    A read-only mapping gets a read-only view."""

    def __init__(self, domid: int, refs: Sequence[int], writable: bool, addr) -> None:
        super().__init__(domid, refs, writable, addr, view_writable=writable)


@dataclass(frozen=True)
class GrantCopySegment:
    """One gnttab_copy operand on the foreign side: `length` bytes at `offset` in the page
    `ref` that domain `domid` granted. Xen refuses a copy that crosses a page boundary
    (GNTST_bad_copy_arg), so offset + length must stay within one page."""

    domid: int
    ref: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_domid(self.domid)
        if not 0 <= self.ref < 2**32:
            raise GrantError(f"grant copy: ref {self.ref!r} is not a uint32")
        if not (0 <= self.offset and 0 < self.length and self.offset + self.length <= PAGE_SIZE):
            raise GrantError(
                f"grant copy: offset {self.offset} + length {self.length} must lie within one page"
            )


class XenGrantSharer(GrantSharer):
    """A libxengntshr handle. Pages are zeroed by gntalloc when allocated."""

    def __init__(self) -> None:
        self._lib = _lib(GNTTAB_SONAME)
        handle = self._lib.xengntshr_open(ffi.NULL, 0)
        if handle == ffi.NULL:
            _open_failed(PlatformError, "xengntshr_open", "gntalloc")
        self._handle = handle
        self._shared: dict[int, XenSharedPages] = {}
        self._lock = threading.Lock()

    def _live(self):
        if self._handle is None:
            raise GrantError("gntshr handle is closed")
        return self._handle

    def share(self, domid: int, count: int, writable: bool = True) -> SharedPages:
        _check_domid(domid)
        _check_count(count)
        with self._lock:
            refs = ffi.new("uint32_t[]", count)
            addr = self._lib.xengntshr_share_pages(self._live(), domid, count, refs, int(bool(writable)))
            if addr == ffi.NULL:
                _raise(GrantError, f"xengntshr_share_pages(domid={domid}, count={count})")
            pages = XenSharedPages(domid, list(refs), bool(writable), addr)
            self._shared[id(pages)] = pages
            return pages

    def unshare(self, pages: SharedPages) -> None:
        """Revoke and release. Linux gntalloc ends foreign access itself and, when the peer
        still maps a page, keeps that page out of reuse until the peer lets go (the XSA-396
        fix), so this never raises GrantStillMapped on real Xen: the kernel quarantines."""
        with self._lock:
            if self._shared.get(id(pages)) is not pages:
                raise GrantError("unshare: these pages were not shared by this handle (or already unshared)")
            pages._release_view("unshare")
            del self._shared[id(pages)]
            if self._lib.xengntshr_unshare(self._live(), pages._addr, len(pages.refs)) != 0:
                _raise(GrantError, f"xengntshr_unshare(count={len(pages.refs)})")

    def is_mapped(self, pages: SharedPages) -> bool | None:
        # The grant entry's GTF_reading/GTF_writing flags live in the kernel's grant table,
        # which gntalloc does not expose to userspace.
        return None

    @property
    def shared(self) -> tuple[SharedPages, ...]:
        """Pages currently shared through this handle (tests check nothing leaks)."""
        with self._lock:
            return tuple(self._shared.values())

    def close(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            for pages in list(self._shared.values()):
                if pages._view is not None:
                    try:
                        pages._view.release()
                    except BufferError:
                        pass  # the handle close below frees the memory regardless
                    pages._view = None
                self._lib.xengntshr_unshare(self._handle, pages._addr, len(pages.refs))
            self._shared.clear()
            self._lib.xengntshr_close(self._handle)
            self._handle = None


class XenGrantMapper(GrantMapper):
    """A libxengnttab handle: maps grants of other domains (kernel gntdev)."""

    def __init__(self) -> None:
        self._lib = _lib(GNTTAB_SONAME)
        handle = self._lib.xengnttab_open(ffi.NULL, 0)
        if handle == ffi.NULL:
            _open_failed(PlatformError, "xengnttab_open", "gntdev")
        self._handle = handle
        self._mapped: dict[int, XenMappedPages] = {}
        self._lock = threading.Lock()

    def _live(self):
        if self._handle is None:
            raise GrantError("gnttab handle is closed")
        return self._handle

    def map(self, domid: int, refs: Sequence[int], writable: bool) -> MappedPages:
        _check_domid(domid)
        refs = list(refs)
        _check_count(len(refs))
        if not all(isinstance(r, int) and 0 <= r < 2**32 for r in refs):
            raise GrantError(f"grant refs must be uint32 ints, got {refs[:8]!r}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        with self._lock:
            c_refs = ffi.new("uint32_t[]", refs)
            addr = self._lib.xengnttab_map_domain_grant_refs(self._live(), len(refs), domid, c_refs, prot)
            if addr == ffi.NULL:
                _raise(GrantError, f"xengnttab_map_domain_grant_refs(domid={domid}, "
                                   f"{len(refs)} refs, {'rw' if writable else 'ro'})")
            pages = XenMappedPages(domid, refs, bool(writable), addr)
            self._mapped[id(pages)] = pages
            return pages

    def unmap(self, pages: MappedPages) -> None:
        with self._lock:
            if self._mapped.get(id(pages)) is not pages:
                raise GrantError("unmap: these pages were not mapped by this handle (or already unmapped)")
            pages._release_view("unmap")
            del self._mapped[id(pages)]
            if self._lib.xengnttab_unmap(self._live(), pages._addr, len(pages.refs)) != 0:
                _raise(GrantError, f"xengnttab_unmap(count={len(pages.refs)})")

    @property
    def has_grant_copy(self) -> bool:
        """True when libxengnttab has xengnttab_grant_copy (symbol version 1.1)."""
        return hasattr(self._lib, "xengnttab_grant_copy")

    def copy_from_grants(self, segments: Sequence[GrantCopySegment], into) -> None:
        """Copy the foreign `segments`, in order, into the writable buffer `into` (one
        GNTTABOP_copy batch: no mapping, so nothing to revoke afterwards)."""
        self._grant_copy(segments, into, to_foreign=False)

    def copy_to_grants(self, data, segments: Sequence[GrantCopySegment]) -> None:
        """Copy consecutive bytes of `data` into the foreign `segments`, in order."""
        self._grant_copy(segments, data, to_foreign=True)

    def _grant_copy(self, segments: Sequence[GrantCopySegment], local, to_foreign: bool) -> None:
        if not self.has_grant_copy:
            raise GrantError("xengnttab_grant_copy: not in this libxengnttab (needs symbol version 1.1)")
        segments = list(segments)
        if not segments:
            return
        total = sum(s.length for s in segments)
        local_ptr = ffi.from_buffer(local, require_writable=not to_foreign)
        if len(local_ptr) < total:
            raise GrantError(f"grant copy: local buffer has {len(local_ptr)} bytes, segments need {total}")
        segs = ffi.new("xengnttab_grant_copy_segment_t[]", len(segments))
        pos = 0
        for seg, c in zip(segments, segs):
            virt = ffi.cast("char *", local_ptr) + pos
            if to_foreign:
                c.source.virt = virt
                c.dest.foreign.ref, c.dest.foreign.offset, c.dest.foreign.domid = seg.ref, seg.offset, seg.domid
                c.flags = ffi.integer_const("GNTCOPY_dest_gref")
            else:
                c.source.foreign.ref, c.source.foreign.offset, c.source.foreign.domid = seg.ref, seg.offset, seg.domid
                c.dest.virt = virt
                c.flags = ffi.integer_const("GNTCOPY_source_gref")
            c.len = seg.length
            pos += seg.length
        with self._lock:
            if self._lib.xengnttab_grant_copy(self._live(), len(segments), segs) != 0:
                _raise(GrantError, f"xengnttab_grant_copy({len(segments)} segments)")
        for i, c in enumerate(segs):
            if c.status != 0:  # GNTST_okay
                status = -c.status
                why = _GNTST_MESSAGES[status] if status < len(_GNTST_MESSAGES) else "unknown status"
                seg = segments[i]
                raise GrantError(
                    f"grant copy segment {i} (domid {seg.domid} ref {seg.ref}): GNTST {c.status} ({why})"
                )

    @property
    def mapped(self) -> tuple[MappedPages, ...]:
        with self._lock:
            return tuple(self._mapped.values())

    def close(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            for pages in list(self._mapped.values()):
                if pages._view is not None:
                    try:
                        pages._view.release()
                    except BufferError:
                        pass
                    pages._view = None
                self._lib.xengnttab_unmap(self._handle, pages._addr, len(pages.refs))
            self._mapped.clear()
            self._lib.xengnttab_close(self._handle)
            self._handle = None


@dataclass(frozen=True)
class XenDirectLink:
    """A bound port's raw parts for a compiled wait loop (XenEventChannels.direct_link): the
    libxenevtchn handle, its fd (non-blocking), the C addresses of xenevtchn_pending,
    xenevtchn_unmask and xenevtchn_notify (the loaded library's own functions), the local
    port, and the handle's links_changed when it was taken."""

    handle: int
    fd: int
    pending_fn: int
    unmask_fn: int
    notify_fn: int
    port: int
    generation: int
    kind: str = "xenevtchn"


class XenEventChannels(EventChannels):
    """A libxenevtchn handle. Its fd is made non-blocking so that pending() never blocks;
    wait for events with select/poll on fileno() and your own timeout.

    `direct_link(port)` offers a compiled wait loop (blkback_ringloop.c's xt_wait) the handle
    and libxenevtchn's own functions, when `port` is the only port bound on it (so every
    event the handle delivers is that port's); `links_changed` moves on bind, unbind and
    close. The caller must stop using a link before close(): the handle is freed there."""

    def __init__(self) -> None:
        self._lib = _lib(EVTCHN_SONAME)
        handle = self._lib.xenevtchn_open(ffi.NULL, 0)
        if handle == ffi.NULL:
            _open_failed(PlatformError, "xenevtchn_open", "evtchn")
        self._handle = handle
        self._fd = self._lib.xenevtchn_fd(handle)
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._ports: set[int] = set()
        self._lock = threading.Lock()
        self.links_changed = 0

    def _live(self):
        if self._handle is None:
            raise EventChannelError("event channel handle is closed")
        return self._handle

    def fileno(self) -> int:
        self._live()
        return self._fd

    @property
    def ports(self) -> frozenset[int]:
        """Local ports bound through this handle."""
        with self._lock:
            return frozenset(self._ports)

    def bind_unbound(self, remote_domid: int) -> int:
        with self._lock:
            port = self._lib.xenevtchn_bind_unbound_port(self._live(), remote_domid)
            if port < 0:
                _raise(EventChannelError, f"xenevtchn_bind_unbound_port(remote domid {remote_domid})")
            self._ports.add(port)
            self.links_changed += 1
            return port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        with self._lock:
            port = self._lib.xenevtchn_bind_interdomain(self._live(), remote_domid, remote_port)
            if port < 0:
                _raise(EventChannelError,
                       f"xenevtchn_bind_interdomain(remote domid {remote_domid}, port {remote_port})")
            self._ports.add(port)
            self.links_changed += 1
            return port

    def notify(self, port: int) -> None:
        if self._lib.xenevtchn_notify(self._live(), port) != 0:
            _raise(EventChannelError, f"xenevtchn_notify(port {port})")

    def pending(self) -> int | None:
        port = self._lib.xenevtchn_pending(self._live())
        if port < 0:
            err = ffi.errno
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):  # non-blocking fd: nothing pending
                return None
            _raise(EventChannelError, "xenevtchn_pending", err)
        return port

    def unmask(self, port: int) -> None:
        if self._lib.xenevtchn_unmask(self._live(), port) != 0:
            _raise(EventChannelError, f"xenevtchn_unmask(port {port})")

    def unbind(self, port: int) -> None:
        with self._lock:
            if self._lib.xenevtchn_unbind(self._live(), port) != 0:
                _raise(EventChannelError, f"xenevtchn_unbind(port {port})")
            self._ports.discard(port)
            self.links_changed += 1

    def direct_link(self, port: int) -> XenDirectLink | None:
        """The handle and libxenevtchn's functions for a compiled wait loop, or None unless
        `port` is the only port bound on this handle (a pending port is then always it)."""
        with self._lock:
            if self._handle is None or self._ports != {port}:
                return None
            lib = self._lib
            return XenDirectLink(
                handle=int(ffi.cast("uintptr_t", self._handle)), fd=self._fd,
                pending_fn=int(ffi.cast("uintptr_t", lib.xenevtchn_pending)),
                unmask_fn=int(ffi.cast("uintptr_t", lib.xenevtchn_unmask)),
                notify_fn=int(ffi.cast("uintptr_t", lib.xenevtchn_notify)),
                port=port, generation=self.links_changed,
            )

    def close(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            # Closing the evtchn device unbinds every port it bound.
            self._lib.xenevtchn_close(self._handle)
            self._handle = None
            self._ports.clear()
            self.links_changed += 1


def _is_dom0() -> bool:
    try:
        return "control_d" in CAPABILITIES.read_text()
    except OSError:
        return False


class XenPlatform(Platform):
    """This process's domain on real Xen.

    Construction fails with PlatformError when /dev/xen is absent. `domid` is 0 in dom0
    (control_d in /proc/xen/capabilities); in a domU it is read once from the xenstore
    key "domid" of the domain's own directory (Linux exposes no domid file in sysfs).
    """

    name = "xen"

    def __init__(self, xenstore_path: str | None = None) -> None:
        if not DEV_XEN.is_dir():
            raise PlatformError(
                f"real Xen: {DEV_XEN} is absent (not running in a Xen domain, or the xen driver "
                "modules xen-gntdev, xen-gntalloc, xen-evtchn are not loaded)"
            )
        self.dom0 = _is_dom0()
        self._xenstore_path = xenstore_path
        self._domid: int | None = 0 if self.dom0 else None
        self.full_barrier: Callable[[], None] | None = full_barrier()

    @property
    def domid(self) -> int:
        if self._domid is None:
            client = self.open_xenstore()
            try:
                value = client.read("domid")
            finally:
                client.close()
            text = value.decode() if isinstance(value, bytes) else str(value)
            if not text.isdigit():
                raise PlatformError(f"xenstore key 'domid' holds {text!r}, not a domain id")
            self._domid = int(text)
        return self._domid

    def open_gntshr(self) -> XenGrantSharer:
        return XenGrantSharer()

    def open_gnttab(self) -> XenGrantMapper:
        return XenGrantMapper()

    def open_evtchn(self) -> XenEventChannels:
        return XenEventChannels()

    def open_xenstore(self, timeout: float = 10.0):
        """A XenstoreClient for this domain: the path given at construction, else (as
        libxenstore) $XENSTORED_PATH, dom0's xenstored socket, or the xenbus device."""
        from xentools.platform.xenstore import XenstoreClient, default_path

        path = self._xenstore_path or default_path()
        try:
            return XenstoreClient.connect(path, timeout)
        except XenstoreError as err:
            fix = xenbus_fix(path)
            if not fix:
                raise
            raise XenstoreError(f"{err}; {fix}", errno_name=err.errno_name) from None


def xenbus_fix(path: str) -> str:
    """What to do when xenstore cannot be reached through the xenbus device `path` (a domU
    has no xenstored socket: Linux's xenbus frontend, built into the kernel, serves the
    device): "" for any other path, or when the device looks usable."""
    from xentools.platform.xenstore import XENBUS_DEVICE, XENBUS_PROC

    if path not in (XENBUS_DEVICE, XENBUS_PROC):
        return ""
    if not os.path.exists(path):
        return (f"{path} is absent: mount devtmpfs on /dev (`mount -t devtmpfs devtmpfs /dev`, Linux's "
                f"xenbus frontend creates it there), or mount xenfs (`mount -t xenfs xenfs /proc/xen`) "
                f"and set XENSTORED_PATH={XENBUS_PROC}")
    if not os.access(path, os.R_OK | os.W_OK):
        return f"no access to {path}: run as root, or give this user read-write access to it (a udev rule)"
    return ""
