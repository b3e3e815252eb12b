"""SoftwarePlatform: one domain's view of the software Xen running under a root directory.

Owns: the layout of the root directory (grantd.sock, xenstored.sock, xenstored.sock.d<N>),
the Platform implementation that opens grant, event channel and xenstore handles there, and
the full memory barrier the software platform offers.
Must not: start services (launcher.py does), or know anything about blkif.

The full barrier: a shared ring needs store->load ordering between its producer index write
and its event index read (ring.h's xen_mb()). On x86 only a locked instruction or MFENCE gives
that, and Python cannot emit one; CFFI's ABI mode cannot either. Here the two instructions
`mfence; ret` (4 bytes of machine code, no compiler) are placed in an executable page and
called through ctypes. Intel SDM vol. 3A 8.2.5: MFENCE serialises all loads and stores issued
before it. Elsewhere (not x86-64, or a policy refusing executable memory) the gcc-built
barrier of xentools.platform.barrier is used if it can be had, else `full_barrier` is None
and the ring always notifies.
"""

from __future__ import annotations

import ctypes
import os
import platform as _host
import threading
from collections.abc import Callable

from xentools.platform import barrier
from xentools.platform.interface import Platform, PlatformError
from xentools.platform.sim.evtchn import SoftwareEventChannels
from xentools.platform.sim.grants import SoftwareGrantMapper, SoftwareGrantSharer
from xentools.platform.xenstore import XenstoreClient

GRANTD_SOCKET = "grantd.sock"
XENSTORED_SOCKET = "xenstored.sock"

_MFENCE_RET = bytes((0x0F, 0xAE, 0xF0, 0xC3))  # mfence; ret
_barrier: Callable[[], None] | None = None
_barrier_tried = False
_barrier_lock = threading.Lock()


def _make_mfence() -> Callable[[], None] | None:
    if _host.machine().lower() not in ("x86_64", "amd64"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    mmap = libc.mmap
    mmap.restype = ctypes.c_void_p
    mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
    ]
    mprotect = libc.mprotect
    mprotect.restype = ctypes.c_int
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    prot_rw, prot_rx = 0x1 | 0x2, 0x1 | 0x4
    map_private_anonymous = 0x02 | 0x20
    size = 4096
    addr = mmap(None, size, prot_rw, map_private_anonymous, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    ctypes.memmove(addr, _MFENCE_RET, len(_MFENCE_RET))
    # Write, then make executable and no longer writable (W^X).
    if mprotect(addr, size, prot_rx) != 0:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        return None
    # The page stays mapped for the life of the process: the function lives there.
    return ctypes.CFUNCTYPE(None)(addr)


def full_barrier_or_none() -> Callable[[], None] | None:
    """A real full memory barrier for this process, or None where none can be had."""
    global _barrier, _barrier_tried
    with _barrier_lock:
        if not _barrier_tried:
            _barrier_tried = True
            try:
                _barrier = _make_mfence()
            except (OSError, AttributeError):
                _barrier = None
            if _barrier is None:
                _barrier = barrier.full_barrier()
        return _barrier


def xenstored_socket_path(root_dir: str, domid: int) -> str:
    """The xenstored socket a domain connects to: the dom0 socket, or the one per domU."""
    path = os.path.join(root_dir, XENSTORED_SOCKET)
    return path if domid == 0 else f"{path}.d{domid}"


class SoftwarePlatform(Platform):
    """Domain `domid` of the software Xen whose sockets live in `root_dir`."""

    name = "software"

    def __init__(self, root_dir: str, domid: int) -> None:
        if not isinstance(domid, int) or not 0 <= domid < 0x7FF0:
            raise PlatformError(f"sim.bad_domid: {domid!r} is not a domain id")
        self.root_dir = root_dir
        self.domid = domid
        self.grantd_path = os.path.join(root_dir, GRANTD_SOCKET)
        self.xenstored_path = xenstored_socket_path(root_dir, domid)
        self.full_barrier = full_barrier_or_none()

    def open_gntshr(self) -> SoftwareGrantSharer:
        return SoftwareGrantSharer(self.grantd_path, self.domid)

    def open_gnttab(self) -> SoftwareGrantMapper:
        return SoftwareGrantMapper(self.grantd_path, self.domid)

    def open_evtchn(self) -> SoftwareEventChannels:
        return SoftwareEventChannels(self.grantd_path, self.domid)

    def open_xenstore(self, timeout: float = 10.0) -> XenstoreClient:
        return XenstoreClient.connect(self.xenstored_path, timeout=timeout)

    def __repr__(self) -> str:
        return f"SoftwarePlatform(root_dir={self.root_dir!r}, domid={self.domid})"
