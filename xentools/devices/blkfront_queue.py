"""One blkfront queue: a shared ring, its shadow of requests in flight, and their encoding.

Owns: `InFlight` (the shadow entry of a request on the ring), `BlkfrontQueue` (ring, event
channel port, shadow, free request ids, backlog) and `Violation` (a backend broke a rule).
A queue may carry the lanes of a batch (`batch`, blkfront_batch.BatchLanes): their responses
are reaped first by the compiled reap where it is built (blkfront_ringloop.c, the same checks
below; it leaves anything else unconsumed), and the Python loop below judges every other
response, and all of them where the reap is not built: it stays the authority.
Must not: talk to xenstore, own grant pages, or complete user futures (blkfront.py does), or
describe a blkif struct: slots are built and read with xentools.core.blkif.SlotCodec.

Checks on every response (Linux 5.16 blkfront after XSA-376, and stricter):
- The response is copied out of the ring once (FrontRing.get_response) and every field is
  read from that private copy (XSA-155).
- rsp_prod - rsp_cons must not exceed the ring size (FrontRing raises "ring.rsp_overflow").
- id: Linux checks id < RING_SIZE and that the slot is waiting. Here an id is
  `sequence * RING_SIZE + slot`, unique over the device's life: the slot is `id & (size-1)`
  (always in range) and the response must carry exactly the id of the request waiting in
  that slot, so a stale or duplicated response for a slot since reused is caught too
  ("response.id").
- operation must be the request's (for INDIRECT: its inner READ/WRITE, as Linux blkback
  answers, or INDIRECT itself, which blkif.h's "copied from request" allows) ("response.op").
- status must be OKAY, ERROR or EOPNOTSUPP ("response.status"); anything else is not a
  blkif status and the device fails rather than guess.
"""

from __future__ import annotations

from collections import deque

from xentools.core.blkif import (
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SlotCodec,
)
from xentools.core.errors import RemoteProtocolError, RingError
from xentools.core.ring import FrontRing, SharedRing, ring_entries
from xentools.platform.interface import SharedPages

__all__ = ["BlkfrontQueue", "InFlight", "Violation"]

_STATUSES = (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)


class Violation(RemoteProtocolError):
    """The backend broke a rule; the device must fail. Internal to the device layer."""


class InFlight:
    """The shadow of one blkif request: what the response must match and what to release.

    `op` is the operation on the ring, `rsp_op` the operation the response must carry
    (the inner op for INDIRECT). `parent` is the user-level operation this request is one
    chunk of; `offset`/`nbytes` its part of that operation's buffer. Resources: a run of a
    staging buffer (persistent grants) or a DmaMap (per-request grants).
    """

    __slots__ = (
        "id", "slot", "op", "rsp_op", "parent", "offset", "nbytes", "sector", "nr_sectors",
        "staging", "start", "npages", "dma_map", "deadline", "queue", "secure", "lane",
    )

    def __init__(self) -> None:
        self.id = -1
        self.slot = -1
        self.op = BLKIF_OP_READ
        self.rsp_op = BLKIF_OP_READ
        self.parent = None
        self.offset = 0
        self.nbytes = 0
        self.sector = 0
        self.nr_sectors = 0
        self.staging = None
        self.start = 0
        self.npages = 0
        self.dma_map = None
        self.deadline = 0.0
        self.queue = None
        self.secure = False
        self.lane = -1  # >= 0: the lane of a batch (blkfront_batch) this request rides


class BlkfrontQueue:
    """Ring `index` of a device: 2**order shared pages, one event channel port."""

    def __init__(
        self,
        index: int,
        codec: SlotCodec,
        pages: SharedPages,
        order: int,
        full_barrier,
        port: int,
    ) -> None:
        self.index = index
        self.codec = codec
        self.pages = pages
        self.order = order
        self.port = port
        self.size = ring_entries(order, codec.abi.entry_size)
        self.mask = self.size - 1
        shared = SharedRing(pages.buf, codec.abi.entry_size, self.size)
        # Only the frontend initialises the shared ring (ring.h SHARED_RING_INIT).
        self.ring = FrontRing.create(shared, full_barrier)
        self.shadow: list[InFlight | None] = [None] * self.size
        self.free_slots: list[int] = list(range(self.size - 1, -1, -1))
        self._sequence = 0
        self.backlog: deque[InFlight] = deque()  # chunks waiting for a slot or pages
        self.unpushed = False  # requests written to slots but req_prod not yet published
        self.in_flight = 0  # requests on the ring or holding a slot while waiting for refs
        self.requests = 0  # requests put on this ring so far
        self.batch = None  # blkfront_batch.BatchLanes riding this queue, if any
        self.settled = 0  # batch requests completed by take_responses (not in its list)

    def claim_slot(self, entry: InFlight) -> bool:
        """Give `entry` a free shadow slot and a fresh id; False if every slot is busy."""
        if not self.free_slots:
            return False
        slot = self.free_slots.pop()
        self._sequence += 1
        entry.slot = slot
        entry.id = ((self._sequence * self.size) | slot) & 0xFFFFFFFFFFFFFFFF
        entry.queue = self
        self.shadow[slot] = entry
        self.in_flight += 1
        return True

    def reserve_ids(self, count: int) -> int:
        """Reserve `count` request ids for a batch's lanes (BatchLanes): returns the sequence
        number before them; the k-th (from 1) is (sequence + k) * size + slot."""
        sequence = self._sequence
        self._sequence += count
        return sequence

    def release_slot(self, entry: InFlight) -> None:
        """Forget `entry` (after its response, or when it never reached the ring)."""
        if self.shadow[entry.slot] is entry:
            self.shadow[entry.slot] = None
            self.free_slots.append(entry.slot)
            self.in_flight -= 1

    def put(self, request: bytes | bytearray) -> None:
        self.ring.put_request(request)
        self.unpushed = True
        self.requests += 1

    def push(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY; True if the backend must be notified."""
        self.unpushed = False
        return self.ring.push_requests_and_check_notify()

    def take_responses(self) -> tuple[list[tuple[InFlight, int]], Violation | None]:
        """Consume every response the ring holds now, checked (see the module docstring).

        Returns the completed entries with their status, in ring order, and the first
        violation (after which nothing more is read: the device fails). Entries returned
        have left the shadow; their slots are free again. Requests of a batch are completed
        here (BatchLanes) and counted in `settled`, not returned.
        """
        ring = self.ring
        batch = self.batch
        unpack = self.codec.response.unpack_from
        shadow = self.shadow
        mask = self.mask
        done: list[tuple[InFlight, int]] = []
        try:
            while True:
                if batch is not None and batch.compiled:
                    self.settled += batch.reap_compiled()
                count = ring.unconsumed_responses()
                for _ in range(count):
                    raw = ring.get_response()  # private copy (XSA-155)
                    rsp_id, op, status = unpack(raw)
                    entry = shadow[rsp_id & mask]
                    if entry is None or entry.id != rsp_id:
                        return done, Violation(
                            "response.id", f"queue {self.index}: response id {rsp_id:#x} matches no request in flight"
                        )
                    if op != entry.rsp_op and not (entry.op == BLKIF_OP_INDIRECT and op == BLKIF_OP_INDIRECT):
                        return done, Violation(
                            "response.op",
                            f"queue {self.index}: response to id {rsp_id:#x} has operation {op}, "
                            f"the request was {entry.rsp_op}",
                        )
                    if status not in _STATUSES:
                        return done, Violation(
                            "response.status", f"queue {self.index}: status {status} is not a blkif status"
                        )
                    if entry.lane >= 0:  # a lane keeps its slot: BatchLanes frees the lane
                        batch.finish(entry, status)
                        self.settled += 1
                        continue
                    shadow[entry.slot] = None
                    self.free_slots.append(entry.slot)
                    self.in_flight -= 1
                    done.append((entry, status))
                if not ring.final_check_for_responses():
                    return done, None
        except RingError as err:
            return done, Violation(err.rule, f"queue {self.index}: {err.detail}")

    def entries(self) -> list[InFlight]:
        """Requests holding a slot now."""
        return [entry for entry in self.shadow if entry is not None]
