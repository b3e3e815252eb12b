"""The shared producer/consumer ring of xen/io/ring.h, over a memoryview of the ring pages.

Owns: ring sizing (`ring_entries`), the shared ring header and slots (`SharedRing`), and
the front and back halves with their private indices (`FrontRing`, `BackRing`): flow
control, overflow checks, and the notification hold-off decisions of ring.h.
Must not: know what a slot holds (blkif.py encodes and decodes entries), notify an event
channel, sleep, or allocate/map the pages: callers pass in the memoryview and act on the
booleans returned here.

Index arithmetic: RING_IDX is a u32 that runs freely and wraps at 2**32; every difference
below is taken mod 2**32, and a slot is `index & (size - 1)`.

Memory ordering (read this before changing anything):
- ring.h issues a write barrier before publishing a producer index and a read barrier
  after reading one. Here both are no-ops: on x86 (TSO) stores are not reordered with
  older stores nor loads with older loads, so those barriers only stop the C compiler, and
  the interpreter performs each memoryview access as an opaque call in program order.
  Weakly ordered CPUs (Arm) would need real barriers there; they are not supported.
- The one barrier x86 does need is the full barrier (store then load) in
  RING_PUSH_*_AND_CHECK_NOTIFY (publish prod, then read the peer's event) and in
  RING_FINAL_CHECK_FOR_* (write our event, then re-read the peer's prod). Python cannot
  emit a locked instruction, so the platform passes `full_barrier`, which is called at
  exactly those two places and nowhere else.
- When `full_barrier` is None, the store may still sit in the store buffer when the load
  runs, so the event check may read a stale value. Then push_*_and_check_notify ALWAYS
  returns True (the peer is always notified: no lost wakeup on its side), and
  final_check_* still sets the event and re-checks, returning the re-check. A peer that
  relies on our barrier (a C peer skipping notifications per the event index) could still
  leave us asleep with work queued, so a consumer without a full barrier must also
  re-check the ring periodically (poll with a timeout).

Peer distrust: the producer index written by the peer is read ONCE per check and judged
(XSA-376 for a frontend, RING_REQUEST_PROD_OVERFLOW for a backend); a slot is handed out
only as a private copy (XSA-155). Errors raise `RingError` with a stable rule.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from xentools.core.errors import RingError

__all__ = [
    "BackRing",
    "FrontRing",
    "MAX_RING_ORDER",
    "RING_HEADER_SIZE",
    "RING_PAGE_SIZE",
    "RingError",
    "SharedRing",
    "XENBUS_MAX_RING_GRANT_ORDER",
    "ring_entries",
]

RING_PAGE_SIZE = 4096  # ring.h: XEN_PAGE_SHIFT 12, whatever the guest's page size
# offsetof(struct *_sring, ring): four RING_IDX, pvt (4 bytes), __pad[44].
RING_HEADER_SIZE = 64
# Largest order ring_entries computes (256 pages); any ring.h user could go that far.
MAX_RING_ORDER = 8
# Largest order a blkif ring may use: Linux's XENBUS_MAX_RING_GRANT_ORDER (16 pages), the
# bound backends advertise as max-ring-page-order. Enforcing it is the handshake's job.
XENBUS_MAX_RING_GRANT_ORDER = 4

_MASK = 0xFFFFFFFF
_REQ_PROD = 0
_REQ_EVENT = 4
_RSP_PROD = 8
_RSP_EVENT = 12
_PVT = 16  # pvt union, 4 bytes, then __pad[44]


def _rd32(value: int) -> int:
    """Largest power of two <= value (ring.h __RD32), 0 for 0."""
    return 1 << (value.bit_length() - 1) if value > 0 else 0


def ring_entries(order: int, entry_size: int) -> int:
    """Entries in a ring of 2**order pages: __CONST_RING_SIZE for 4096 << order bytes.

    The largest power of two <= (4096 * 2**order - 64) / entry_size. For blkif (entry 112
    on x86_64, 108 on x86_32) orders 0..4 give 32, 64, 128, 256, 512. Orders 0..8 are
    computed (blkif itself stops at XENBUS_MAX_RING_GRANT_ORDER = 4); others raise
    RingError "ring.order"; an entry larger than the space raises "ring.entry_size".
    """
    if type(order) is not int or not 0 <= order <= MAX_RING_ORDER:
        raise RingError("ring.order", f"order {order!r} not in 0..{MAX_RING_ORDER}")
    if type(entry_size) is not int or entry_size <= 0:
        raise RingError("ring.entry_size", f"entry size {entry_size!r} is not positive")
    entries = _rd32(((RING_PAGE_SIZE << order) - RING_HEADER_SIZE) // entry_size)
    if entries == 0:
        raise RingError("ring.entry_size", f"no {entry_size}-byte entry fits in order {order}")
    return entries


class SharedRing:
    """The shared page(s): header fields and slots, as ring.h's struct *_sring.

    `buf` is a contiguous writable memoryview of the ring pages (at least
    64 + nr_ents * entry_size bytes); `nr_ents` must be a power of two. Header fields are
    native u32 (RING_IDX), each read or written with one aligned access; setters store the
    value mod 2**32. Every getter reads shared memory afresh: callers that must not
    double-fetch read a field once into a local.
    Raises RingError "ring.buffer" or "ring.size" on a bad buffer or size.
    """

    def __init__(self, buf: memoryview | bytearray, entry_size: int, nr_ents: int) -> None:
        view = memoryview(buf)
        if view.readonly or not view.c_contiguous:
            raise RingError("ring.buffer", "the ring buffer must be contiguous and writable")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if type(entry_size) is not int or entry_size <= 0:
            raise RingError("ring.entry_size", f"entry size {entry_size!r} is not positive")
        if type(nr_ents) is not int or nr_ents <= 0 or nr_ents & (nr_ents - 1):
            raise RingError("ring.size", f"nr_ents {nr_ents!r} is not a power of two")
        needed = RING_HEADER_SIZE + nr_ents * entry_size
        if view.nbytes < needed:
            raise RingError(
                "ring.buffer",
                f"{view.nbytes} bytes cannot hold {nr_ents} entries of {entry_size}"
                f" (need {needed})",
            )
        self.buf = view
        self.entry_size = entry_size
        self.nr_ents = nr_ents
        # The four indices as native u32 cells, as ring.h's RING_IDX. Each get/set is ONE
        # aligned 32-bit load or store, which the CPU
        # performs atomically: struct.pack_into zero-fills its target before packing
        # (CPython's s_pack_internal), so a peer reading between the two would see the index
        # as 0, a producer running backwards (false overflow) or an event in the past (lost
        # notification).
        self._cells = view[:RING_HEADER_SIZE].cast("I")

    def _get(self, offset: int) -> int:
        return self._cells[offset >> 2]

    def _set(self, offset: int, value: int) -> None:
        self._cells[offset >> 2] = value & _MASK

    def release(self) -> None:
        """Drop the views of the shared pages (they pin the buffer) before the pages go."""
        self._cells.release()
        self.buf.release()

    @property
    def req_prod(self) -> int:
        """Requests produced (written by the frontend)."""
        return self._get(_REQ_PROD)

    @req_prod.setter
    def req_prod(self, value: int) -> None:
        self._set(_REQ_PROD, value)

    @property
    def req_event(self) -> int:
        """Notify the backend when req_prod passes this (written by the backend)."""
        return self._get(_REQ_EVENT)

    @req_event.setter
    def req_event(self, value: int) -> None:
        self._set(_REQ_EVENT, value)

    @property
    def rsp_prod(self) -> int:
        """Responses produced (written by the backend)."""
        return self._get(_RSP_PROD)

    @rsp_prod.setter
    def rsp_prod(self, value: int) -> None:
        self._set(_RSP_PROD, value)

    @property
    def rsp_event(self) -> int:
        """Notify the frontend when rsp_prod passes this (written by the frontend)."""
        return self._get(_RSP_EVENT)

    @rsp_event.setter
    def rsp_event(self, value: int) -> None:
        self._set(_RSP_EVENT, value)

    def init(self) -> None:
        """SHARED_RING_INIT: producers 0, events 1, pvt and __pad zero. Frontend only.

        The backend attaches to a ring the frontend initialised; it never calls this.
        """
        self.req_prod = 0
        self.rsp_prod = 0
        self.req_event = 1
        self.rsp_event = 1
        self.buf[_PVT:RING_HEADER_SIZE] = bytes(RING_HEADER_SIZE - _PVT)

    def slot_offset(self, index: int) -> int:
        """Byte offset of the slot for a free-running index."""
        return RING_HEADER_SIZE + (index & (self.nr_ents - 1)) * self.entry_size

    def slot(self, index: int) -> memoryview:
        """The shared memory of slot `index & (nr_ents - 1)` (no copy: the peer may change it)."""
        start = self.slot_offset(index)
        return self.buf[start : start + self.entry_size]

    def read_slot(self, index: int) -> bytes:
        """One private copy of a slot (RING_COPY_REQUEST/RESPONSE, XSA-155)."""
        return bytes(self.slot(index))

    def write_slot(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at the start of a slot; the rest of the slot is left as it is.

        Raises RingError "ring.entry_length" if data is longer than entry_size.
        """
        length = memoryview(data).nbytes
        if length > self.entry_size:
            raise RingError(
                "ring.entry_length", f"{length} bytes do not fit a {self.entry_size}-byte slot"
            )
        start = self.slot_offset(index)
        self.buf[start : start + length] = memoryview(data).cast("B")


class FrontRing:
    """The frontend's half (struct *_front_ring): produce requests, consume responses.

    Construction is FRONT_RING_ATTACH at `index` (req_prod_pvt = rsp_cons = index); it
    does not touch shared memory. `FrontRing.create` is XEN_FRONT_RING_INIT: it also
    initialises the shared ring, which only a frontend may do. `full_barrier` is the
    platform's full memory barrier or None (see the module docstring).
    """

    def __init__(
        self, shared: SharedRing, full_barrier: Callable[[], None] | None, index: int = 0
    ) -> None:
        self.shared = shared
        self.full_barrier = full_barrier
        self._req_prod_pvt = index & _MASK
        self._rsp_cons = index & _MASK
        # End of the responses validated by the last unconsumed_responses(): get_response
        # never goes past it, so a consumer loop is bounded by one checked read of rsp_prod.
        self._rsp_avail = self._rsp_cons

    @classmethod
    def create(cls, shared: SharedRing, full_barrier: Callable[[], None] | None) -> FrontRing:
        """SHARED_RING_INIT then FRONT_RING_INIT: a fresh ring, indices 0."""
        shared.init()
        return cls(shared, full_barrier, 0)

    @property
    def size(self) -> int:
        """RING_SIZE: number of slots."""
        return self.shared.nr_ents

    @property
    def req_prod_pvt(self) -> int:
        """Requests written to slots, published or not (private)."""
        return self._req_prod_pvt

    @req_prod_pvt.setter
    def req_prod_pvt(self, value: int) -> None:
        self._req_prod_pvt = value & _MASK

    @property
    def rsp_cons(self) -> int:
        """Responses consumed (private)."""
        return self._rsp_cons

    @rsp_cons.setter
    def rsp_cons(self, value: int) -> None:
        self._rsp_cons = value & _MASK
        self._rsp_avail = self._rsp_cons

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS: slots not holding an unanswered request."""
        return self.size - ((self._req_prod_pvt - self._rsp_cons) & _MASK)

    def full(self) -> bool:
        """RING_FULL."""
        return self.free_requests() <= 0

    def put_request(self, data: bytes | bytearray | memoryview) -> None:
        """Write a request into slot req_prod_pvt and advance it (not yet published).

        Raises RingError "ring.full" when every slot holds an unanswered request (the
        flow control ring.h leaves to its user), or "ring.entry_length".
        """
        if self.full():
            raise RingError("ring.full", f"all {self.size} slots hold unanswered requests")
        self.shared.write_slot(self._req_prod_pvt, data)
        self._req_prod_pvt = (self._req_prod_pvt + 1) & _MASK

    def push_requests_and_check_notify(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish; True if the backend needs an event.

        True when req_event lies in (old, new], i.e. (u32)(new - req_event) < (u32)(new - old).
        Without a full barrier, always True.
        """
        shared = self.shared
        old = shared.req_prod
        new = self._req_prod_pvt
        # xen_wmb(): a no-op here, see the module docstring.
        shared.req_prod = new
        if self.full_barrier is None:
            return True
        self.full_barrier()  # backend sees new requests before we check req_event
        return ((new - shared.req_event) & _MASK) < ((new - old) & _MASK)

    def unconsumed_responses(self) -> int:
        """Responses published and not consumed, from ONE read of rsp_prod.

        Raises RingError "ring.rsp_overflow" if rsp_prod - rsp_cons > size (mod 2**32):
        the backend claims more responses than slots, or moved rsp_prod backwards
        (RING_RESPONSE_PROD_OVERFLOW, XSA-376). The frontend should then fail the device.
        """
        rsp_prod = self.shared.rsp_prod
        available = (rsp_prod - self._rsp_cons) & _MASK
        if available > self.size:
            raise RingError(
                "ring.rsp_overflow",
                f"rsp_prod {rsp_prod} - rsp_cons {self._rsp_cons} exceeds ring size {self.size}",
            )
        self._rsp_avail = rsp_prod
        return available

    def get_response(self) -> bytes:
        """A private copy of slot rsp_cons, then rsp_cons advances.

        Only responses counted by the last unconsumed_responses() (or final check) are
        handed out; otherwise RingError "ring.empty".
        """
        if self._rsp_cons == self._rsp_avail:
            raise RingError("ring.empty", "no checked response left: call unconsumed_responses()")
        data = self.shared.read_slot(self._rsp_cons)
        self._rsp_cons = (self._rsp_cons + 1) & _MASK
        return data

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: True if responses wait; else arm rsp_event and re-check.

        Sets rsp_event = rsp_cons + 1 (event on the very next response), full barrier, then
        checks again. Call before sleeping; False means sleep until the next event.
        """
        if self.unconsumed_responses():
            return True
        self.shared.rsp_event = self._rsp_cons + 1
        if self.full_barrier is not None:
            self.full_barrier()
        return self.unconsumed_responses() > 0


class BackRing:
    """The backend's half (struct *_back_ring): consume requests, produce responses.

    Construction is BACK_RING_ATTACH at `index` (rsp_prod_pvt = req_cons = index). The
    backend never initialises the shared ring: the frontend did. `full_barrier` as for
    FrontRing.
    """

    def __init__(
        self, shared: SharedRing, full_barrier: Callable[[], None] | None, index: int = 0
    ) -> None:
        self.shared = shared
        self.full_barrier = full_barrier
        self._rsp_prod_pvt = index & _MASK
        self._req_cons = index & _MASK
        # End of the requests validated by the last unconsumed_requests().
        self._req_avail = self._req_cons

    @property
    def size(self) -> int:
        """RING_SIZE: number of slots."""
        return self.shared.nr_ents

    @property
    def rsp_prod_pvt(self) -> int:
        """Responses written to slots, published or not (private)."""
        return self._rsp_prod_pvt

    @rsp_prod_pvt.setter
    def rsp_prod_pvt(self, value: int) -> None:
        self._rsp_prod_pvt = value & _MASK

    @property
    def req_cons(self) -> int:
        """Requests consumed (private)."""
        return self._req_cons

    @req_cons.setter
    def req_cons(self, value: int) -> None:
        self._req_cons = value & _MASK
        self._req_avail = self._req_cons

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS from ONE read of req_prod.

        min(req_prod - req_cons, size - (req_cons - rsp_prod_pvt)), mod 2**32: the second
        term stops us reading a slot whose response we have not yet written. Raises
        RingError "ring.req_overflow" if req_prod - rsp_prod_pvt > size
        (RING_REQUEST_PROD_OVERFLOW: the frontend claims more requests than slots).
        """
        req_prod = self.shared.req_prod
        if ((req_prod - self._rsp_prod_pvt) & _MASK) > self.size:
            raise RingError(
                "ring.req_overflow",
                f"req_prod {req_prod} - rsp_prod_pvt {self._rsp_prod_pvt}"
                f" exceeds ring size {self.size}",
            )
        req = (req_prod - self._req_cons) & _MASK
        rsp = (self.size - ((self._req_cons - self._rsp_prod_pvt) & _MASK)) & _MASK
        available = min(req, rsp)
        self._req_avail = (self._req_cons + available) & _MASK
        return available

    def get_request(self) -> bytes:
        """A private copy of slot req_cons (RING_COPY_REQUEST, XSA-155), then req_cons advances.

        Only requests counted by the last unconsumed_requests() (or final check) are handed
        out; otherwise RingError "ring.empty".
        """
        if self._req_cons == self._req_avail:
            raise RingError("ring.empty", "no checked request left: call unconsumed_requests()")
        data = self.shared.read_slot(self._req_cons)
        self._req_cons = (self._req_cons + 1) & _MASK
        return data

    def put_response(self, data: bytes | bytearray | memoryview) -> None:
        """Write a response into slot rsp_prod_pvt and advance it (not yet published).

        Raises RingError "ring.no_request" when every consumed request is already
        answered (a response then would overwrite a slot the frontend still owns), or
        "ring.entry_length".
        """
        if self._rsp_prod_pvt == self._req_cons:
            raise RingError(
                "ring.no_request", "every consumed request already has a response"
            )
        self.shared.write_slot(self._rsp_prod_pvt, data)
        self._rsp_prod_pvt = (self._rsp_prod_pvt + 1) & _MASK

    def push_responses_and_check_notify(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish; True if the frontend needs an event.

        True when rsp_event lies in (old, new]. Without a full barrier, always True.
        """
        shared = self.shared
        old = shared.rsp_prod
        new = self._rsp_prod_pvt
        # xen_wmb(): a no-op here, see the module docstring.
        shared.rsp_prod = new
        if self.full_barrier is None:
            return True
        self.full_barrier()  # frontend sees new responses before we check rsp_event
        return ((new - shared.rsp_event) & _MASK) < ((new - old) & _MASK)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if requests wait; else arm req_event and re-check."""
        if self.unconsumed_requests():
            return True
        self.shared.req_event = self._req_cons + 1
        if self.full_barrier is not None:
            self.full_barrier()
        return self.unconsumed_requests() > 0
