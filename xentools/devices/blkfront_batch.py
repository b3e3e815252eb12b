"""blkfront's batch and buffer API: many requests per call, lanes of persistent grants.

Owns: `BatchLanes` (the lanes of one queue: fixed runs of persistent-grant pages, each
carrying one request at a time; filling a batch of READ/WRITE requests into the ring and
completing their responses, through the compiled fill and reap of blkfront_ringloop.c where
it is built, else in Python with the same results; a read_many's rounds), `Stream` (one
read_many's state), `BatchIO` (the device-facing API over them: submit many, reap many,
one push and at most one notification per batch; read_many) and
`flayout_of` (struct xt_flayout from xentools.core.blkif's Abi: the C code has no layout of
its own).
Must not: judge a response the compiled reap left (BlkfrontQueue.take_responses does, and
fails the device with the rule: it stays the authority), build a blkif struct by hand
(the Python fill uses the core's SlotCodec), or share a page outside the device's
persistent-grant pool (its lanes are runs of blkfront_pool.StagingArea, within the budget
the device already keeps: never more pages than the backend's persistent-grant cache).

Usage (the device must use persistent grants):
    io = dev.batch_io(depth=32, request_bytes=4096)
    tags = io.submit_reads([(sector, buf), (sector, 8), ...])   # buf: copied into, once;
                                                               # 8: stays in the pool page
    for tag, status in io.reap(min_done=8): ...                # BLKIF_RSP_* per request
    io.view(tag)        # the read's bytes in the granted pages, until `tag` is reused
    io.submit_writes([(sector, data), ...]); io.close()
Fewer Python steps per request: register one buffer per lane once, then read by sector:
    io.register_buffers([bytearray(4096) for _ in range(32)])
    tags = io.read_sectors([s1, s2, ...])       # request_bytes each, into buffers[tag]
    done, failed = io.reap_tags(1)              # tags; (tag, status) of the failed ones
Many reads into one buffer, the ring kept full until all are done (a quiet batch):
    io.read_many(sectors, into)     # the k-th into into[k * request_bytes : (k + 1) * request_bytes]
  With a direct event channel (below) one compiled call (xt_front_stream) fills the free
  lanes once half are free, publishes and notifies, sleeps and reaps, round after round
  (`Stream` holds its state); it comes back to Python for what is Python's (as the wait
  below), for another thread's request on the queue (it gives way: the rest goes on in the
  Python loop beside the futures) and every 50 ms. Elsewhere the same loop runs in Python
  over fill and reap.
Waiting: with a direct event channel (EventChannels.direct_link: the software Xen's, or on
real Xen a libxenevtchn handle whose only port is this queue's) a reap that must wait makes
one compiled call (blkfront_ringloop.c, xt_front_wait) that reaps, arms rsp_event at the
response that makes `min_done` (ring.h's final check; never past what is in flight), sleeps
on the doorbell, takes and unmasks the event, and reaps again; read_sectors and the submits publish and
notify through xt_front_push. A larger `min_done` means fewer wake-ups per request. What is
not plainly valid comes back to Python as before (the response judged by take_responses;
an event-channel state for the Python handle; an event with nothing behind it, counted and
throttled as the completion thread does, XSA-391). Without one (a handle with several
queues' ports) the Python wait takes the events.
Zeroing (XSA-403: zero pages before sharing them; never share a page that also holds
unrelated data). A lane's pages come zeroed from the pool (fresh pages are zero, and
blkfront_pool zeroes a run when it is given back) and go back zeroed at close(); in
between they are persistently shared with this device's backend and carry only this
device's requests. Every byte on them was either written there by that backend (a read's
data) or put there for that backend to read (a write's data): the backend has already seen
all of it, so nothing leaks by sharing it again, and a lane's pages are not zeroed between
requests (a memset of the whole request per read: 1 MiB per 1 MiB read). Linux's
xen-blkfront does the same with its persistent grants since the XSA-403 fix: their pages are
allocated zeroed once, not cleared per request. The one consequence: a backend that answers
a READ with OKAY without writing gives the lane's earlier bytes (this device's, which that
backend already had), not zeros.
"""

from __future__ import annotations

import select
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from xentools.core.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    Abi,
    indirect_pages_for,
)
from xentools.devices.blkback_ringloop import WAIT_EVTCHN, WAIT_STOP, WAIT_UNMASK, evt_of
from xentools.devices.blkback_ringloop import compiled as compiled_module
from xentools.devices.blkfront_queue import BlkfrontQueue, InFlight
from xentools.devices.blkfront_types import BlkfrontError, DeviceFailed, RequestFailed
from xentools.platform.interface import PAGE_SIZE, PlatformError

__all__ = ["BatchIO", "BatchLanes", "Lane", "Stream", "flayout_of"]

_STOP_PYTHON = 1  # xt_front_reap: the next response is the Python path's to judge
WAIT_SPURIOUS = 64  # xt_front_wait: an event with nothing behind it (beside blkback's WAIT_*)
# What else ends an xt_front_stream (blkfront_ringloop.c's XS_*).
STREAM_FAILED, STREAM_NOTIFY, STREAM_GIVE_WAY, STREAM_REFUSED, STREAM_DONE = 128, 256, 512, 1024, 2048


def flayout_of(module: Any, abi: Abi) -> Any:
    """A struct xt_flayout with the offsets of `abi`, field by field by name (the one codec)."""
    layout = module.ffi.new("struct xt_flayout *")
    for name, _ in module.ffi.typeof("struct xt_flayout").fields:
        setattr(layout, name, getattr(abi, name))
    return layout


@dataclass(frozen=True)
class Lane:
    """One lane's pages: `data` (contiguous data pages), `segments` (their packed blkif
    segments as whole pages, ref by ref), `indirect` (contiguous indirect pages or None) and
    `indirect_refs` (their refs)."""

    data: memoryview
    segments: bytes
    indirect: memoryview | None = None
    indirect_refs: tuple[int, ...] = ()


class _Parent:
    """What a lane's InFlight entry points to: BlkFront._fail finishes `future` of every
    entry in flight with DeviceFailed, which is how a batch learns the device failed."""

    __slots__ = ("future",)

    def __init__(self, future: Any) -> None:
        self.future = future


class _Failure:
    """The `future` of a batch's entries: records the device's failure for the batch."""

    __slots__ = ("error", "_notify")

    def __init__(self, notify: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self._notify = notify

    def done(self) -> bool:
        return self.error is not None

    def _finish(self, _result: object, error: BaseException | None) -> None:
        if self.error is None and error is not None:
            self.error = error
            self._notify()


class _LaneEntry(InFlight):
    """The shadow entry of a lane, in its shadow slot for the lane's life. What the Python
    path checks a response against (id, operation, deadline) is read from the lanes'
    bookkeeping (the C shadow where the fill and reap are compiled): an idle lane has id
    -1, which no response carries."""

    __slots__ = ("_lanes",)

    def __init__(self, lanes: BatchLanes, lane: int, slot: int, parent: _Parent) -> None:
        self._lanes = lanes
        self.lane = lane
        self.slot = slot
        self.parent = parent
        self.queue = lanes.queue
        self.offset = self.nbytes = self.sector = self.nr_sectors = self.start = self.npages = 0
        self.staging = self.dma_map = None
        self.secure = False

    id = property(lambda self: self._lanes.expected(self.lane)[0])  # type: ignore[assignment]
    op = property(lambda self: self._lanes.expected(self.lane)[1])  # type: ignore[assignment]
    rsp_op = property(lambda self: self._lanes.expected(self.lane)[2])  # type: ignore[assignment]
    deadline = property(lambda self: self._lanes.expected(self.lane)[3])  # type: ignore[assignment]


class Stream:
    """One read_many: `count` READs of `nbytes` at `sectors`, the k-th into
    into[k * nbytes : (k + 1) * nbytes]. While the compiled stream carries it (`c`, the
    struct xt_stream of BatchLanes.stream_begin) its state is there; else here (the Python
    loop over fill and reap). `next`: the next request to fill; `done`: completed OKAY;
    `failed`: (request index, status) of the first read that failed (no more fills then).
    A fill takes the free lanes once `refill` of them are free or the rest fits."""

    def __init__(self, sectors: list[int], into: memoryview, nbytes: int, depth: int) -> None:
        self.sectors = array("Q", sectors)
        self.into = into
        self.nbytes = nbytes
        self.count = len(sectors)
        self.refill = max(1, depth // 2)
        self.index_of = [0] * depth  # per lane: the request it carries (Python loop)
        self._next = self._done = 0
        self._failed: tuple[int, int] | None = None
        self.give_way = False  # another thread's request waits: leave the compiled stream
        self.closing = False  # BatchIO.close() from another thread: no more fills
        self.owner = 0  # the thread running read_many
        self.c: Any = None
        self.keep: list[Any] = []  # what the C struct points to

    next = property(lambda self: int(self.c.next) if self.c is not None else self._next)
    done = property(lambda self: int(self.c.done) if self.c is not None else self._done)

    @property
    def failed(self) -> tuple[int, int] | None:
        c = self.c
        if c is not None and c.failed_lane >= 0:
            return int(c.failed_index), int(c.failed_status)
        return self._failed

    def completed(self, index: int, status: int, lane: int) -> None:
        """Request `index` (on `lane`) completed with `status`."""
        c = self.c
        if c is not None:
            if status == 0:
                c.done += 1
            elif c.failed_lane < 0:
                c.failed_lane, c.failed_index, c.failed_status = lane, index, status
        elif status == 0:
            self._done += 1
        elif self._failed is None:
            self._failed = (index, status)

    def index(self, lane: int) -> int:
        return int(self.c.index_of[lane]) if self.c is not None else self.index_of[lane]

    def wants_fill(self, free: int) -> int:
        """How many requests the next fill takes with `free` lanes free (0: none yet)."""
        left = self.count - self.next
        if self.closing or self.failed is not None or not left or not free or (free < self.refill and free < left):
            return 0
        return min(free, left)


class BatchLanes:
    """The lanes of one BlkfrontQueue (attached as `queue.batch` until `detach()`). Each
    lane holds one shadow slot of the queue for its life.

    `fill(op, requests, deadline)` puts [(sector, nbytes, buffer)] on free lanes and the
    ring (not published: the caller pushes), returning the lanes used; completions are
    appended to `completed` as (lane, status) by `reap_compiled()` (the C reap, called by
    take_responses) or `finish()` (the Python path, called by take_responses for a
    response it judged); `take_completed()` hands them over and frees their lanes.
    `module` is the compiled extension or None (pure Python: the same results).
    """

    def __init__(self, queue: BlkfrontQueue, lanes: list[Lane], *, handle: int, unit: int, module: Any,
                 on_settle: Callable[[], None] = lambda: None) -> None:
        if queue.batch is not None:
            raise BlkfrontError("batch.busy", f"queue {queue.index} already carries a batch")
        if not lanes or len(lanes) > len(queue.free_slots):
            raise BlkfrontError("batch.depth", f"{len(lanes)} lanes: the ring has {len(queue.free_slots)} free slots")
        self.queue = queue
        self.lanes = lanes
        self.handle = handle
        self.unit = unit
        self.codec = queue.codec
        self.on_settle = on_settle
        self.future = _Failure(lambda: self.on_settle())
        parent = _Parent(self.future)
        count = len(lanes)
        self.entries: list[_LaneEntry] = []
        for index in range(count):
            slot = queue.free_slots.pop()
            entry = _LaneEntry(self, index, slot, parent)
            queue.shadow[slot] = entry
            self.entries.append(entry)
        self.free: list[int] = list(range(count - 1, -1, -1))
        # Completions not yet handed over: lanes and their statuses, in order.
        self.done_lanes: list[int] = []
        self.done_status: list[int] = []
        self.busy = 0  # lanes whose request is on the ring
        # Per lane, the Python path's bookkeeping (the C lanes and shadow keep their own):
        # the request it carries.
        self._id = [-1] * count
        self._wire = [BLKIF_OP_READ] * count
        self._op = [BLKIF_OP_READ] * count
        self._deadline = [0.0] * count
        self._nbytes = [0] * count
        self._dest: list[Any] = [None] * count
        self._reg: list[memoryview] = []  # registered read buffers per lane (register)
        self._reg_keep: list[Any] = []
        self.compiled = False
        self.stream: Stream | None = None  # the read_many the compiled stream carries (stream_begin)
        self.pins: list[Any] = []  # what reads in flight still copy into after read_many left (detach drops)
        self._evt: Any = None  # struct xt_evt while the direct event channel is attached (compiled)
        self.compiled_fills = 0  # requests written by the compiled fill
        self.compiled_reaps = 0  # responses completed by the compiled reap
        if module is not None:
            self._setup_compiled(module)
        queue.batch = self

    def _setup_compiled(self, module: Any) -> None:
        ffi, lib = module.ffi, module.lib
        self._ffi, self._lib = ffi, lib
        self._layout = flayout_of(module, self.codec.abi)
        count = len(self.lanes)
        self._c_lanes = ffi.new("struct xt_lane[]", count)
        self._keep = []  # the segment arrays whose addresses the C lanes hold
        for index, lane in enumerate(self.lanes):
            c = self._c_lanes[index]
            c.slot = self.entries[index].slot
            c.data = self._address(lane.data)
            segments = ffi.from_buffer(lane.segments)
            self._keep.append(segments)
            c.segs = segments
            c.pages = lane.data.nbytes // PAGE_SIZE
            if lane.indirect is not None:
                c.ind = self._address(lane.indirect)
                c.ind_pages = lane.indirect.nbytes // PAGE_SIZE
                for i, ref in enumerate(lane.indirect_refs):
                    c.ind_grefs[i] = ref
        size = self.queue.size
        self._c_shadow = ffi.new("struct xt_shadow[]", size)
        for slot in range(size):
            self._c_shadow[slot].lane = -1
        self._c_lane_of = ffi.new("uint32_t[]", count)
        self._c_sector = ffi.new("uint64_t[]", count)
        self._c_nbytes = ffi.new("uint32_t[]", count)
        self._lane_of_view = memoryview(ffi.buffer(self._c_lane_of)).cast("I")
        self._sector_view = memoryview(ffi.buffer(self._c_sector)).cast("Q")
        self._uniform_nbytes = -1  # every entry of _c_nbytes holds this (-1: not known)
        self._c_bufs = ffi.new("uint8_t *[]", count)
        self._out_lane = ffi.new("uint32_t[]", count)
        self._out_status = ffi.new("int16_t[]", count)
        # Views over the arrays: a slice's tolist() and an array's bytes beat cffi's
        # element-by-element conversion (measured: 0.7 against 2.8 us for 32).
        self._out_lane_view = memoryview(ffi.buffer(self._out_lane)).cast("I")
        self._out_status_view = memoryview(ffi.buffer(self._out_status)).cast("h")
        self._stop = ffi.new("int *")
        self._index = ffi.new("uint32_t *")
        self._cons = ffi.new("uint32_t *")  # wait_compiled's (a fill on another thread uses _index)
        self._flags = ffi.new("uint32_t *")
        self._sring = self._address(self.queue.ring.shared.buf)
        self._pointers: list[Any] = [None] * count  # (from_buffer object, buffer) of reads in flight
        self._held = 0  # how many of them are set
        self.compiled = True

    def _address(self, view: memoryview) -> Any:
        # The address only: holding a buffer export would stop the pages from being unshared.
        ffi = self._ffi
        return ffi.cast("uint8_t *", int(ffi.cast("uintptr_t", ffi.from_buffer(view))))

    def expected(self, lane: int) -> tuple[int, int, int, float]:
        """(id, operation on the ring, operation of the response, deadline) of the request
        on `lane`; id -1 and deadline 0 when the lane is idle."""
        if self.compiled:
            shadow = self._c_shadow[self.entries[lane].slot]
            if shadow.lane < 0:
                return -1, BLKIF_OP_READ, BLKIF_OP_READ, 0.0
            return int(shadow.id), shadow.op, shadow.rsp_op, shadow.deadline
        if self._id[lane] < 0:
            return -1, BLKIF_OP_READ, BLKIF_OP_READ, 0.0
        return self._id[lane], self._wire[lane], self._op[lane], self._deadline[lane]

    # -- filling ----------------------------------------------------------------------------

    def fill(self, op: int, requests: list[tuple[int, int, Any]], deadline: float) -> list[int]:
        """Put requests (sector, nbytes, buffer) on free lanes and the ring; `buffer` is a
        WRITE's data, a READ's destination or None (the data stays in the lane). The
        caller checked every value. Returns the lanes used, in order: fewer than asked
        when every lane is busy."""
        used, seq = self._claim(len(requests))
        if not used:
            return []
        if self.compiled:
            self._fill_compiled(op, requests[: len(used)], used, seq, deadline)
        else:
            for k, lane in enumerate(used):
                self._fill_python(lane, op, requests[k], self._id_of(seq, k, lane), deadline)
        self._filled(len(used))
        return used

    def _claim(self, count: int) -> tuple[list[int], int]:
        """Up to `count` free lanes (taken) and the sequence their request ids start after."""
        free = self.free
        n = min(count, len(free))
        if not n:
            return [], 0
        used = free[-n:][::-1]
        del free[-n:]
        return used, self.queue.reserve_ids(n)

    def _id_of(self, seq: int, k: int, lane: int) -> int:
        """The id of the k-th request of a fill (what xt_front_fill computes)."""
        return ((seq + k + 1) * self.queue.size + self.entries[lane].slot) & 0xFFFFFFFFFFFFFFFF

    def _filled(self, n: int) -> None:
        queue = self.queue
        queue.unpushed = True
        queue.requests += n
        queue.in_flight += n
        self.busy += n

    def register(self, buffers: list[Any]) -> None:
        """Lane i's reads by `fill_registered` are copied into buffers[i] (writable,
        contiguous, at least as large as the reads; exported until `detach()`)."""
        if self.compiled:
            ffi = self._ffi
            self._reg_keep = [ffi.from_buffer(b) for b in buffers]  # pinned: their addresses are in C
            for lane, pointer in enumerate(self._reg_keep):
                self._c_lanes[lane].reg = pointer
        self._reg = [memoryview(b).cast("B") for b in buffers]

    def fill_registered(self, sectors: list[int], nbytes: int, deadline: float) -> list[int]:
        """READs of `nbytes` at `sectors` on free lanes, each copied into its lane's
        registered buffer (register): as fill, with fewer Python steps per request."""
        used, seq = self._claim(len(sectors))
        if not used:
            return []
        n = len(used)
        if self.compiled:
            self._lane_of_view[:n] = array("I", used)
            self._sector_view[:n] = array("Q", sectors if n == len(sectors) else sectors[:n])
            if self._uniform_nbytes != nbytes:
                self._c_nbytes[0 : len(self.lanes)] = [nbytes] * len(self.lanes)
                self._uniform_nbytes = nbytes
            self._c_fill(BLKIF_OP_READ, n, self._ffi.NULL, seq, deadline, registered=1)
        else:
            reg = self._reg
            for k, lane in enumerate(used):
                self._fill_python(lane, BLKIF_OP_READ, (sectors[k], nbytes, reg[lane]), self._id_of(seq, k, lane),
                                  deadline)
        self._filled(n)
        return used

    def _fill_compiled(self, op: int, requests: list[tuple[int, int, Any]], used: list[int], seq: int,
                       deadline: float) -> None:
        ffi = self._ffi
        n = len(used)
        self._c_lane_of[0:n] = used
        sectors, sizes, buffers = zip(*requests)
        self._c_sector[0:n] = sectors
        self._c_nbytes[0:n] = sizes
        self._uniform_nbytes = -1
        bufs = ffi.NULL
        if buffers.count(None) != n:
            from_buffer = ffi.from_buffer
            pointers = [ffi.NULL if b is None else from_buffer(b) for b in buffers]
            self._c_bufs[0:n] = pointers
            bufs = self._c_bufs
            if op == BLKIF_OP_READ:
                held = self._pointers
                pinned = 0
                for lane, pointer, buffer in zip(used, pointers, buffers):
                    if buffer is not None:
                        # The destination stays exported (pinned) until the response.
                        held[lane] = (pointer, buffer)
                        pinned += 1
                self._held += pinned
        self._c_fill(op, n, bufs, seq, deadline, registered=0)

    def _c_fill(self, op: int, n: int, bufs: Any, seq: int, deadline: float, *, registered: int) -> None:
        """xt_front_fill over the n requests staged in the C arrays, at the ring's private
        producer, which it advances."""
        ring = self.queue.ring
        self._index[0] = ring.req_prod_pvt
        written = self._lib.xt_front_fill(
            self._layout, self._sring, self.queue.size, self._index, self._c_shadow, self._c_lanes,
            len(self.lanes), self._c_lane_of, self._c_sector, self._c_nbytes, bufs, n, op,
            seq, deadline, self.handle, self.unit, registered,
        )
        if written != n:  # a value the caller should have refused: our bug, not the peer's
            raise BlkfrontError("batch.fill", f"the compiled fill wrote {written} of {n} requests")
        ring.req_prod_pvt = self._index[0]
        self.compiled_fills += written

    def _fill_python(self, lane: int, op: int, request: tuple[int, int, Any], req_id: int, deadline: float) -> None:
        """The pure-Python fill: what xt_front_fill writes, through the core's SlotCodec."""
        sector, nbytes, buffer = request
        info = self.lanes[lane]
        data = info.data
        ndata = -(-nbytes // PAGE_SIZE)
        tail = nbytes - (ndata - 1) * PAGE_SIZE
        if op == BLKIF_OP_WRITE:  # no zeroing: see the module docstring
            data[:nbytes] = memoryview(buffer).cast("B")
        codec = self.codec
        segs = bytearray(info.segments[: ndata * codec.segment_size])
        segs[codec.segment_size * (ndata - 1) + codec.last_sect_at] = tail // self.unit - 1
        if ndata <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            wire = op
            request_slot = codec.rw_request(op, self.handle, req_id, sector, segs, ndata)
        else:
            assert info.indirect is not None
            wire = BLKIF_OP_INDIRECT
            info.indirect[: len(segs)] = segs
            pages = indirect_pages_for(ndata)
            request_slot = codec.indirect_request(op, self.handle, req_id, sector, ndata, info.indirect_refs[:pages])
        self.queue.ring.put_request(request_slot)
        self._id[lane] = req_id
        self._wire[lane] = wire
        self._op[lane] = op
        self._deadline[lane] = deadline
        self._nbytes[lane] = nbytes
        self._dest[lane] = buffer if op == BLKIF_OP_READ else None

    # -- completing -------------------------------------------------------------------------

    def reap_compiled(self, limit: int = 0) -> int:
        """The compiled reap (called by take_responses): complete every plain response to a
        lane's request (at most `limit`, if given); stop at anything else and leave it for
        the Python path."""
        ring = self.queue.ring
        self._cons[0] = ring.rsp_cons
        got = self._lib.xt_front_reap(
            self._layout, self._sring, self.queue.size, self._cons, self._c_shadow, self._c_lanes,
            len(self.lanes), self._out_lane, self._out_status, limit or len(self.lanes), self._stop,
        )
        return self.settle_compiled(got)

    # -- the direct event channel (software Xen's words, real Xen's libxenevtchn) -------------

    def attach_events(self, link: Any) -> None:
        """Let push_compiled and wait_compiled send, take and unmask the queue's events
        themselves through `link` (SoftwareEventChannels.direct_link; None: they cannot,
        the device's Python handle does)."""
        if link is None:
            self._evt = None
            return
        self._evt = evt_of(self._ffi, link, (-1, -1), self._evt)  # xt_front_wait does not watch

    @property
    def events_attached(self) -> bool:
        return self._evt is not None

    def event_counts(self) -> tuple[int, int]:
        """(sleeps, events taken) of the compiled wait, ever."""
        evt = self._evt
        return (0, 0) if evt is None else (int(evt.sleeps), int(evt.events))

    def notifies(self) -> int:
        """Notifications the compiled calls sent through the direct channel, ever."""
        evt = self._evt
        return 0 if evt is None else int(evt.notifies)

    def push_compiled(self) -> int:
        """Publish the requests filled so far and notify the backend if it asked
        (xt_front_push): 0 no notify owed, 1 sent, -1 owed and the Python handle's to send."""
        self.queue.unpushed = False
        return int(self._lib.xt_front_push(self._sring, self.queue.ring.req_prod_pvt,
                                            self._evt if self._evt is not None else self._ffi.NULL))

    def wait_compiled(self, want: int, timeout_ms: int) -> tuple[int, int]:
        """xt_front_wait: reap, and sleep on the event channel until `want` responses came
        (at most the requests in flight). Called without the device lock by the thread that
        owns the queue's responses and events (BatchIO._wait_compiled): touches no Python
        state; `settle_compiled(got)` under the lock then hands the completions over.
        Returns (responses reaped, WAIT_* flags)."""
        self._cons[0] = self.queue.ring.rsp_cons
        got = self._lib.xt_front_wait(
            self._layout, self._sring, self.queue.size, self._cons, self._c_shadow, self._c_lanes,
            len(self.lanes), self._out_lane, self._out_status, len(self.lanes), min(want, self.busy), self._stop,
            self._evt, timeout_ms, self._flags,
        )
        return got, int(self._flags[0])

    def settle_compiled(self, got: int) -> int:
        """Hand over the `got` completions a compiled reap or wait left in the out arrays."""
        if not got:
            return 0
        self.queue.ring.rsp_cons = self._cons[0]
        lanes = self._out_lane_view[:got].tolist()
        self.done_lanes += lanes
        self.done_status += self._out_status_view[:got].tolist()
        if self._held:
            held = self._pointers
            released = 0
            for lane in lanes:
                if held[lane] is not None:
                    held[lane] = None
                    released += 1
            self._held -= released
        self.queue.in_flight -= got
        self.busy -= got
        self.compiled_reaps += got
        self.on_settle()
        return got

    # -- streaming reads (BatchIO.read_many) -------------------------------------------------

    def stream_fill(self, st: Stream, deadline: float) -> int:
        """The Python loop's fill: the next requests of `st` on the free lanes, when
        Stream.wants_fill says so, each into its place in st.into. Returns how many."""
        n = st.wants_fill(len(self.free))
        if not n:
            return 0
        first, size, into, sectors = st._next, st.nbytes, st.into, st.sectors
        used = self.fill(BLKIF_OP_READ, [(sectors[i], size, into[i * size : (i + 1) * size])
                                         for i in range(first, first + n)], deadline)
        for k, lane in enumerate(used):
            st.index_of[lane] = first + k
        st._next += len(used)
        return len(used)

    def stream_take(self, st: Stream) -> int:
        """Hand the completions so far (as take_completed) to `st`; their lanes are free
        again (on the compiled stream's stack while it carries `st`). Returns how many."""
        lanes, status = self._take()
        for lane, one in zip(lanes, status):
            st.completed(st.index(lane), one, lane)
        c = st.c
        if c is not None:
            for lane in self.free:  # only these: the stack holds the others
                c.free[c.nfree] = lane
                c.nfree += 1
            self.free = []
        return len(lanes)

    def stream_begin(self, st: Stream) -> None:
        """Let the compiled stream (xt_front_stream) carry `st`: the free lanes (all of
        them: read_many starts on a quiet batch) move onto its stack."""
        ffi = self._ffi
        count = len(self.lanes)
        c = ffi.new("struct xt_stream *")
        sector = ffi.from_buffer("uint64_t[]", st.sectors)
        into = ffi.from_buffer(st.into, require_writable=True)
        index_of = ffi.new("uint64_t[]", count)
        free = ffi.new("uint32_t[]", count)
        st.keep = [sector, into, index_of, free]
        c.next, c.count, c.done = st._next, st.count, st._done
        c.sector, c.into, c.nbytes, c.refill = sector, into, st.nbytes, st.refill
        c.index_of, c.free = index_of, free
        for i, lane in enumerate(self.free):
            free[i] = lane
            index_of[lane] = st.index_of[lane]
        c.nfree = len(self.free)
        self.free = []
        c.handle, c.unit = self.handle, self.unit
        c.lane_of, c.sectors, c.sizes, c.bufs = self._c_lane_of, self._c_sector, self._c_nbytes, self._c_bufs
        self._uniform_nbytes = -1
        c.out_lane, c.out_status = self._out_lane, self._out_status
        c.failed_lane = -1  # read_many starts it before any completion
        st.c = c
        self.stream = st

    def stream_compiled(self, st: Stream, deadline: float, timeout_ms: int) -> int:
        """xt_front_stream over `st` (stream_begin) for at most `timeout_ms` (0: one round
        without a wait). Called as wait_compiled (without the device lock, by the thread
        that owns the queue's responses and events): touches no Python state; settle_stream
        under the lock then. Returns its flags (WAIT_*, STREAM_*)."""
        c = st.c
        ring = self.queue.ring
        c.req_prod_pvt, c.rsp_cons = ring.req_prod_pvt, ring.rsp_cons
        c.seq, c.deadline = self.queue.reserve_ids(0), deadline
        return int(self._lib.xt_front_stream(
            self._layout, self._sring, self.queue.size, self._c_shadow, self._c_lanes, len(self.lanes), c,
            self._evt if self._evt is not None else self._ffi.NULL, timeout_ms,
        ))

    def settle_stream(self, st: Stream) -> tuple[int, int]:
        """After xt_front_stream (under the device lock): the ring's indices, the queue's id
        sequence and the counts follow what it filled (and published) and reaped. Returns
        (filled, reaped)."""
        c = st.c
        queue = self.queue
        ring = queue.ring
        filled, reaped = int(c.filled), int(c.reaped)
        ring.req_prod_pvt = c.req_prod_pvt
        if reaped:
            ring.rsp_cons = c.rsp_cons
        queue.reserve_ids(int(c.seq) - queue.reserve_ids(0))
        queue.unpushed = False  # every round publishes what it filled
        queue.requests += filled
        queue.in_flight += filled - reaped
        self.busy += filled - reaped
        self.compiled_fills += filled
        self.compiled_reaps += reaped
        return filled, reaped

    def stream_leave(self, st: Stream) -> None:
        """The compiled stream stops carrying `st`: its state and free lanes come back here
        (the lanes in flight complete through the compiled reap or finish() as any)."""
        c = st.c
        if c is None:
            return
        st._next, st._done, st._failed = int(c.next), int(c.done), st.failed
        st.index_of = [int(index) for index in c.index_of[0 : len(self.lanes)]]
        self.free = [int(lane) for lane in c.free[0 : c.nfree]]
        st.c = None
        self.stream = None

    def give_way(self) -> None:
        """Another thread's request waits for the queue (BlkFront._start): the compiled
        stream returns at its next round, and read_many goes on in the Python loop."""
        st = self.stream
        if st is not None:
            st.give_way = True
            st.c.give_way = 1

    def finish(self, entry: InFlight, status: int) -> None:
        """Complete a lane's request whose response the Python path judged (what
        xt_front_reap does for the responses it takes): a read's data is copied into the
        lane's destination, if it has one."""
        lane = entry.lane
        data = self.lanes[lane].data
        if self.compiled:
            c = self._c_lanes[lane]
            self._c_shadow[entry.slot].lane = -1
            if c.op == BLKIF_OP_READ and status == 0 and c.dest != self._ffi.NULL:
                self._ffi.memmove(c.dest, data[: c.nbytes], c.nbytes)  # the one copy
            c.dest = self._ffi.NULL
            if self._pointers[lane] is not None:
                self._pointers[lane] = None
                self._held -= 1
        else:
            self._id[lane] = -1
            op, nbytes, dest = self._op[lane], self._nbytes[lane], self._dest[lane]
            if op == BLKIF_OP_READ and status == 0 and dest is not None:
                memoryview(dest).cast("B")[:nbytes] = data[:nbytes]
            self._dest[lane] = None
        self.queue.in_flight -= 1
        self.busy -= 1
        self.done_lanes.append(lane)
        self.done_status.append(status)
        self.on_settle()

    def take_completed(self) -> list[tuple[int, int]]:
        """The completions so far, (lane, status), in order; their lanes are free again."""
        return list(zip(*self._take()))

    def take_lanes(self) -> tuple[list[int], list[tuple[int, int]]]:
        """The lanes completed so far, in order (free again), and the (lane, status) of
        those not BLKIF_RSP_OKAY."""
        lanes, status = self._take()
        return lanes, [(lane, st) for lane, st in zip(lanes, status) if st] if any(status) else []

    def _take(self) -> tuple[list[int], list[int]]:
        lanes, status = self.done_lanes, self.done_status
        self.done_lanes, self.done_status = [], []
        self.free += lanes
        return lanes, status

    @property
    def completed(self) -> int:
        """How many completions wait to be handed over."""
        return len(self.done_lanes)

    def nbytes(self, lane: int) -> int:
        return int(self._c_lanes[lane].nbytes) if self.compiled else self._nbytes[lane]

    def data(self, lane: int) -> memoryview:
        """The bytes of the last read on `lane` as they lie in its granted pages."""
        return self.lanes[lane].data[: self.nbytes(lane)]

    def detach(self) -> None:
        """Give the lanes' shadow slots back (the queue is done with the batch)."""
        queue = self.queue
        if queue.batch is self:
            queue.batch = None
        if self.compiled:
            for c in self._c_lanes[0 : len(self.lanes)]:
                c.reg = self._ffi.NULL
        self._reg_keep = []
        self._reg = []
        self.pins = []
        for entry in self.entries:
            if queue.shadow[entry.slot] is entry:
                queue.shadow[entry.slot] = None
                queue.free_slots.append(entry.slot)


class BatchIO:
    """Batch I/O on one queue of a connected BlkFront with persistent grants (see the
    module docstring). Created by `BlkFront.batch_io()`; close it before the device.

    Its lanes hold `pages` pages of the persistent-grant pool and `depth` shadow slots of
    the queue until close(); the future API of the same device shares what is left (a
    request that can never get pages fails the device with "grants.exhausted", as it
    does without a batch). One batch per queue. Completions are reaped by the caller's
    thread (`reap`, through the compiled reap where it is built); while the caller would
    sleep it waits on the event channel itself and handles the events (`_wait_event`):
    the completion thread takes them only while futures share the queue."""

    def __init__(self, dev: Any, depth: int, request_bytes: int, queue: int = 0) -> None:
        self.dev = dev
        self.closed = False
        with dev._lock:
            dev._check_usable()
            grants, builder = dev._grants, dev._requests
            staging = grants.staging if grants is not None else None
            if builder is None or staging is None:
                raise BlkfrontError("batch.persistent", "batch I/O needs persistent grants (feature-persistent on both sides)")
            if not 0 <= queue < len(dev._rings.queues):
                raise BlkfrontError("batch.queue", f"queue {queue} of {len(dev._rings.queues)}")
            unit = dev._requests.sector_size
            if request_bytes < unit or request_bytes % unit or request_bytes > builder.segments_per_request * PAGE_SIZE:
                raise BlkfrontError(
                    "batch.request_bytes",
                    f"{request_bytes} bytes per request: give whole {unit}-byte sectors, at most "
                    f"{builder.segments_per_request * PAGE_SIZE} (the negotiated segments per request)",
                )
            ring = dev._rings.queues[queue]
            if not 1 <= depth <= ring.size:
                raise BlkfrontError("batch.depth", f"depth {depth}: give 1..{ring.size} (the ring's slots)")
            ndata = -(-request_bytes // PAGE_SIZE)
            nind = indirect_pages_for(ndata) if ndata > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0
            runs: list[tuple[Any, int]] = []
            lanes: list[Lane] = []
            for _ in range(depth):
                got = staging.take(ndata + nind)
                if got is None or got[0].view is None:
                    if got is not None:
                        runs.append(got)
                    for buf, start in runs:
                        buf.give(start, ndata + nind)
                    raise BlkfrontError(
                        "batch.budget",
                        f"{depth} lanes of {ndata + nind} pages do not fit the {grants.data_pages} pages of "
                        f"persistent grants (the backend's cache) beside what is in flight: ask for fewer",
                    )
                runs.append(got)
                buf, start = got
                base = start * PAGE_SIZE
                view = buf.view
                lanes.append(Lane(
                    data=view[base : base + ndata * PAGE_SIZE],
                    segments=bytes(buf.segments[8 * start : 8 * (start + ndata)]),
                    indirect=view[base + ndata * PAGE_SIZE : base + (ndata + nind) * PAGE_SIZE] if nind else None,
                    indirect_refs=tuple(buf.refs[start + ndata : start + ndata + nind]),
                ))
            self._runs = runs
            self._run_pages = ndata + nind
            self.cond = threading.Condition(dev._lock)
            self.lanes = BatchLanes(ring, lanes, handle=builder.handle, unit=unit, module=compiled_module(),
                                    on_settle=self.cond.notify_all)
            self.depth = depth
            self.polled = 0  # responses the caller's thread took (BatchIO.reap)
            self._poller: Any = None  # the event channel, for _wait_event
            self._link_generation = -1  # the handle's links_changed when the lanes were attached
            self.waits = 0  # sleeps on the event channel in the caller's thread (_wait_event)
            self.events_taken = 0  # events the caller's thread took (the completion thread's others)
            self._poll_bytes = 256 * 1024  # what one poll copies at most (unless more are asked)
            self.request_bytes = request_bytes
            self.pages = depth * (ndata + nind)
            self.registered = False  # register_buffers() was called
            self._stream: Stream | None = None  # the read_many running
            self.streamed = 0  # responses the compiled stream took (read_many)
            self.gave_way = 0  # times read_many left the compiled stream for another thread's request

    @property
    def compiled(self) -> bool:
        return self.lanes.compiled

    def _check(self, sector: Any, nbytes: int) -> None:
        dev = self.dev
        unit = dev._requests.sector_size
        if nbytes < 1 or nbytes % unit or nbytes > self.request_bytes:
            raise BlkfrontError("request.length", f"{nbytes} bytes: give whole {unit}-byte sectors, at most {self.request_bytes}")
        if type(sector) is not int or sector < 0 or sector + nbytes // unit > dev._disk.sectors:
            dev._check_range(sector, nbytes // unit)

    def _submit(self, op: int, requests: list[tuple[int, int, Any]]) -> list[int]:
        dev = self.dev
        with dev._lock:
            self._check_open(op)
            unit, most, sectors = dev._requests.sector_size, self.request_bytes, dev._disk.sectors
            for sector, nbytes, _ in requests:
                if (type(sector) is not int or sector < 0 or nbytes < 1 or nbytes > most or nbytes % unit
                        or sector + nbytes // unit > sectors):
                    self._check(sector, nbytes)  # says which, in one line
            used = self.lanes.fill(op, requests, time.monotonic() + dev.config.request_timeout)
            indirect = 0
            if self.request_bytes > BLKIF_MAX_SEGMENTS_PER_REQUEST * PAGE_SIZE:
                indirect = sum(1 for _, n, _ in requests[: len(used)] if n > BLKIF_MAX_SEGMENTS_PER_REQUEST * PAGE_SIZE)
            self._account(len(used), indirect)
            return used

    def _check_open(self, op: int) -> None:
        dev = self.dev
        dev._check_usable()
        if self.closed:
            raise BlkfrontError("batch.closed", "the batch is closed")
        self._check_no_stream()
        if op == BLKIF_OP_WRITE and dev.info.readonly:
            raise BlkfrontError("request.readonly", "the disk is read-only")

    def _check_no_stream(self) -> None:
        stream = self._stream
        if stream is not None and stream.owner != threading.get_ident():
            raise BlkfrontError("batch.busy", "a read_many runs on this batch (in another thread)")

    def _account(self, used: int, indirect: int, sent: int = 0, owed: bool = False) -> None:
        """Count `used` requests just filled (`indirect` of them INDIRECT) and push them
        (the compiled stream pushed its own: `sent` notifications, and `owed` one it could
        not send, which goes through the Python handle)."""
        dev = self.dev
        stats = dev.stats
        stats["requests"] += used
        stats["indirect_requests"] += indirect
        stats["direct_requests"] += used - indirect
        stats["notifications"] += sent
        lanes = self.lanes
        queue = lanes.queue
        if queue.in_flight > stats["max_in_flight"]:
            stats["max_in_flight"] = queue.in_flight
        if owed or (queue.unpushed and self._direct_events()):
            notified = -1 if owed else lanes.push_compiled()
            if notified:
                stats["notifications"] += 1
            if notified < 0:  # the channel needs the Python handle
                try:
                    dev._evtchn.notify(queue.port)
                except PlatformError as err:
                    dev._fail("evtchn.notify", f"queue {queue.index}: {err}")
                    return
        dev._push_all()

    def register_buffers(self, buffers: list[Any]) -> None:
        """Give one writable contiguous buffer of at least `request_bytes` per lane (`depth`
        of them, in tag order): `read_sectors` then copies each read into the buffer of the
        tag it takes, once. They stay exported (cannot be resized) until close()."""
        views = []
        for buf in buffers:
            view = memoryview(buf)
            if view.readonly or not view.c_contiguous or view.nbytes < self.request_bytes:
                raise BlkfrontError("request.buffer", f"a registered buffer must be writable, contiguous and hold "
                                                      f"{self.request_bytes} bytes")
            views.append(view)
        if len(views) != self.depth:
            raise BlkfrontError("request.buffer", f"{len(views)} buffers for {self.depth} lanes: give one per lane")
        with self.dev._lock:
            if self.lanes.busy:
                raise BlkfrontError("batch.busy", "buffers are registered while no read is in flight")
            self.lanes.register(views)
            self.registered = True

    def read_sectors(self, sectors: list[int]) -> list[int]:
        """Read `request_bytes` at each of `sectors`, each into the registered buffer
        (register_buffers) of the tag (lane) it takes; one push for all. Returns the tags
        used, in order: fewer than given when every lane is busy. Every sector is checked
        first (one line naming the first bad one)."""
        dev = self.dev
        with dev._lock:
            self._check_open(BLKIF_OP_READ)
            if not self.registered:
                raise BlkfrontError("batch.buffers", "read_sectors needs register_buffers() first")
            nbytes = self.request_bytes
            if sectors and (set(map(type, sectors)) != {int} or min(sectors) < 0
                            or max(sectors) + nbytes // dev._requests.sector_size > dev._disk.sectors):
                for sector in sectors:
                    self._check(sector, nbytes)  # says which, in one line
            used = self.lanes.fill_registered(sectors, nbytes, time.monotonic() + dev.config.request_timeout)
            self._account(len(used), len(used) if nbytes > BLKIF_MAX_SEGMENTS_PER_REQUEST * PAGE_SIZE else 0)
            return used

    def read_many(self, sectors: list[int], into: Any) -> None:
        """Read `request_bytes` at each of `sectors`, the k-th into
        into[k * request_bytes : (k + 1) * request_bytes] (`into`: a writable contiguous
        buffer), keeping the ring full (every lane) and returning when all are done. With a
        direct event channel it runs in one compiled loop (xt_front_stream) that comes back to
        Python only for what is Python's; elsewhere (or once it gave way) the same loop runs
        here over fill and reap. Needs a quiet batch (nothing in flight or unreaped).
        Futures submitted on the same queue meanwhile wait in the backlog until the
        compiled loop gives way (within a round), then share the queue as with any batch.
        Raises RequestFailed for a read that failed (once the others in flight are done),
        BlkfrontError "batch.closed" when close() is called from another thread meanwhile,
        DeviceFailed when the device fails."""
        dev = self.dev
        lanes = self.lanes
        size = self.request_bytes
        with dev._lock:
            self._check_open(BLKIF_OP_READ)
            try:
                view = memoryview(into)
            except TypeError:
                raise BlkfrontError("request.buffer", f"read_many reads into a buffer, not {type(into).__name__}") from None
            if view.readonly or not view.c_contiguous:
                raise BlkfrontError("request.buffer", "read_many needs a writable contiguous buffer")
            view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            sectors = list(sectors)
            count = len(sectors)
            if view.nbytes < count * size:
                raise BlkfrontError("request.buffer", f"{count} reads of {size} bytes need {count * size} bytes: "
                                                      f"the buffer holds {view.nbytes}")
            if sectors and (set(map(type, sectors)) != {int} or min(sectors) < 0
                            or max(sectors) + size // dev._requests.sector_size > dev._disk.sectors):
                for sector in sectors:
                    self._check(sector, size)  # says which, in one line
            if lanes.busy or lanes.completed:
                raise BlkfrontError("batch.busy", f"read_many needs a quiet batch: {lanes.busy} requests in "
                                                  f"flight, {lanes.completed} not reaped")
            if not count:
                return
            st = Stream(sectors, view, size, self.depth)
            st.owner = threading.get_ident()
            self._stream = st
            try:
                if lanes.compiled and self._owns_queue() and self._direct_events():
                    lanes.stream_begin(st)
                    self._stream_compiled(st)
                self._stream_python(st)
            finally:
                lanes.stream_leave(st)
                if lanes.busy:  # left by an exception: reads in flight still go into `into`
                    lanes.pins.append(st.keep)
                st.keep = []
                self._stream = None
                self.cond.notify_all()
            if st.closing:
                raise BlkfrontError("batch.closed", "the batch was closed during read_many (from another thread)")
            if st.failed is not None:
                index, status = st.failed
                raise RequestFailed("response.eopnotsupp" if status == BLKIF_RSP_EOPNOTSUPP else "response.error",
                                    f"the backend failed a read at sector {st.sectors[index]} (request {index} of "
                                    f"read_many's {count}, status {status})")

    def _stream_compiled(self, st: Stream) -> None:
        """read_many in the compiled stream, without the device lock while it runs (every
        request of the queue is the batch's, as _wait_compiled), until all are done or it
        must go on in the Python loop: a read failed (the rest in flight drained there),
        another thread's request (give way: the backlog is started here) or close()."""
        dev = self.dev
        lanes = self.lanes
        lock = dev._lock
        indirect = self.request_bytes > BLKIF_MAX_SEGMENTS_PER_REQUEST * PAGE_SIZE
        quiet = 0
        while True:
            if lanes.future.error is not None:
                raise lanes.future.error
            if dev._failure is not None:
                raise DeviceFailed(*dev._failure)
            if (st.give_way or st.failed is not None or (st.next == st.count and not lanes.busy)
                    or not self._owns_queue() or not self._direct_events()):
                break
            sleeps, events = lanes.event_counts()
            sent = lanes.notifies()
            deadline = time.monotonic() + dev.config.request_timeout
            dev._event_waiter = self
            state = lock._release_save()  # type: ignore[attr-defined]
            try:
                flags = lanes.stream_compiled(st, deadline, 50)
            finally:
                lock._acquire_restore(state)  # type: ignore[attr-defined]
                dev._event_waiter = None
            if dev._failure is not None:  # failed meanwhile (BlkFront._fail forgot what was in flight)
                continue
            filled, reaped = lanes.settle_stream(st)
            self.streamed += reaped
            self._account(filled, filled if indirect else 0, lanes.notifies() - sent, bool(flags & STREAM_NOTIFY))
            self._after_compiled(reaped, flags, sleeps, events, int(st.c.quiet) - quiet)
            quiet = int(st.c.quiet)
            lanes.stream_take(st)  # what the Python path completed
            if flags & STREAM_REFUSED:  # a value read_many should have refused: our bug, not the peer's
                raise BlkfrontError("batch.fill", "the compiled stream's fill refused a request")
        lanes.stream_leave(st)
        if st.give_way:
            self.gave_way += 1
            dev._run_backlogs()
            dev._push_all()

    def _stream_python(self, st: Stream) -> None:
        """read_many's loop over fill and reap (the same rounds as xt_front_stream): all of
        it without the compiled stream, else what is left after it gave way, or the drain
        after a failed read or close()."""
        dev = self.dev
        lanes = self.lanes
        indirect = self.request_bytes > BLKIF_MAX_SEGMENTS_PER_REQUEST * PAGE_SIZE
        take = lambda: lanes.stream_take(st)  # noqa: E731
        while True:
            filled = lanes.stream_fill(st, time.monotonic() + dev.config.request_timeout)
            if filled:
                self._account(filled, filled if indirect else 0)
            if not lanes.busy:
                return
            draining = st.closing or st.failed is not None or st.next == st.count
            self.reap(lanes.busy if draining else max(1, st.refill - len(lanes.free)), None, take)

    def buffer(self, tag: int) -> memoryview:
        """The registered buffer of `tag` (register_buffers)."""
        return self.lanes._reg[tag]

    def submit_reads(self, requests: Iterable[tuple[int, Any]]) -> list[int]:
        """Read many: (sector, buffer) copies the data once into the writable `buffer`
        (len(buffer) bytes); (sector, nr_sectors) leaves it in the lane's granted pages
        (`view(tag)`). Every request is checked first; one push for all. Returns the tags
        (lanes) used, in order: fewer than given when every lane is busy. Leave a buffer
        alone until its tag is reaped."""
        out: list[tuple[int, int, Any]] = []
        unit = self.dev._requests.sector_size
        for sector, target in requests:
            kind = type(target)
            if kind is int:
                out.append((sector, target * unit, None))
            elif kind is bytearray:  # writable and contiguous: the common buffer, kept short
                out.append((sector, len(target), target))
            else:
                view = memoryview(target)
                if view.readonly or not view.c_contiguous:
                    raise BlkfrontError("request.buffer", "a read needs a writable contiguous buffer")
                out.append((sector, view.nbytes, view))
        return self._submit(BLKIF_OP_READ, out)

    def submit_writes(self, requests: Iterable[tuple[int, Any]]) -> list[int]:
        """Write many: (sector, data), data copied into the lane's pages now. As submit_reads."""
        out = []
        for sector, data in requests:
            view = memoryview(data)
            if not view.c_contiguous:
                raise BlkfrontError("request.buffer", "the data is not contiguous")
            out.append((sector, view.nbytes, view))
        return self._submit(BLKIF_OP_WRITE, out)

    def reap(self, min_done: int = 1, timeout: float | None = None, take: Any = None) -> Any:
        """Wait until at least `min_done` requests (all in flight, if fewer) completed;
        returns every completion so far as (tag, status), status BLKIF_RSP_OKAY (0),
        BLKIF_RSP_ERROR or BLKIF_RSP_EOPNOTSUPP. Raises DeviceFailed if the device failed,
        BlkfrontError "future.timeout" after `timeout` seconds."""
        dev = self.dev
        lanes = self.lanes
        deadline = None if timeout is None else time.monotonic() + timeout
        with dev._lock:
            if dev._on_completion_thread():
                raise BlkfrontError("future.wait_in_callback", "a completion callback cannot wait")
            self._check_no_stream()
            while True:
                if lanes.future.error is not None:
                    raise lanes.future.error
                if dev._failure is not None:
                    raise DeviceFailed(*dev._failure)
                have = len(lanes.done_lanes)
                if have >= min_done or not lanes.busy:
                    return lanes.take_completed() if take is None else take()
                if lanes.compiled and self._owns_queue() and self._direct_events():
                    left = None if deadline is None else deadline - time.monotonic()
                    self._wait_compiled(min_done - have, left)
                    if left is not None and left <= 0 and len(lanes.done_lanes) < min_done and lanes.busy:
                        raise BlkfrontError("future.timeout", f"fewer than {min_done} requests complete after {timeout} s")
                    continue
                if lanes.compiled and dev._connected and self._poll(min_done - have):
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise BlkfrontError("future.timeout", f"fewer than {min_done} requests complete after {timeout} s")
                if self._owns_queue():
                    self._wait_event(left)
                else:
                    self.cond.wait(left)

    def reap_tags(self, min_done: int = 1, timeout: float | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """As reap, returned as (tags completed, in order; (tag, status) of those that
        failed): no tuple per request."""
        return self.reap(min_done, timeout, self.lanes.take_lanes)

    def _poll(self, want: int) -> bool:
        """Take the responses the ring holds now without waiting for an event (under the
        device lock): the compiled reap takes what is plainly valid and answers a lane. Only
        before sleeping is rsp_event armed (ring.h's final check), so while the caller keeps
        finding responses the backend sends no event and no thread is woken. A response
        the compiled reap leaves is the Python path's to judge: here while every request of
        the queue is the batch's, else on the completion thread, woken to re-check the
        ring. True if anything completed (or the device failed)."""
        dev = self.dev
        lanes = self.lanes
        # Large reads are taken a few at a time (each is copied here): the caller can hand
        # their lanes back to the backend sooner, so copying overlaps the backend's reads.
        limit = max(want, self._poll_bytes // self.request_bytes)
        got = lanes.reap_compiled(limit)
        if not got and lanes.queue.ring.final_check_for_responses():
            got = lanes.reap_compiled(limit)  # they came meanwhile
            if not got:  # the head is not a plain lane response: the Python path judges it
                if self._owns_queue():
                    return dev._process(lanes.queue) > 0
                dev._completion.wake()
        dev.stats["responses"] += got
        self.polled += got
        return got > 0

    def _owns_queue(self) -> bool:
        """True if the caller's thread may take the queue's responses and events itself:
        every request on the queue is the batch's (no future's callback would run here),
        and no other caller waits on the events."""
        dev = self.dev
        queue = self.lanes.queue
        return (dev._connected and dev._event_waiter is None and queue.in_flight == self.lanes.busy
                and not queue.backlog)

    def _direct_events(self) -> bool:
        """True when the compiled wait may take, unmask and send the queue's events itself
        (EventChannels.direct_link: the software Xen's direct event channels, kind "words",
        or real Xen's libxenevtchn handle, kind "xenevtchn", when the queue's port is the
        handle's only one): the lanes are (re)attached whenever the handle's links changed.
        The compiled calls run without the device lock, with BlkFront._event_waiter set:
        close() waits for it before the handle is closed, so the handle outlives them."""
        lanes = self.lanes
        evtchn = self.dev._evtchn
        if not lanes.compiled or evtchn is None:
            return False
        changed = evtchn.links_changed
        if changed != self._link_generation:
            lanes.attach_events(evtchn.direct_link(lanes.queue.port))
            self._link_generation = changed
        return lanes.events_attached

    def _wait_compiled(self, want: int, left: float | None) -> None:
        """Reap and sleep in one compiled call (xt_front_wait) until `want` responses came,
        without the device lock (while every request of the queue is the batch's, as
        _wait_event), at most 50 ms. It returns early with what is the Python path's,
        handled by _after_compiled."""
        dev = self.dev
        lanes = self.lanes
        lock = dev._lock
        sleeps, events = lanes.event_counts()
        dev._event_waiter = self
        state = lock._release_save()  # type: ignore[attr-defined]
        try:
            got, flags = lanes.wait_compiled(want, 50 if left is None else max(0, min(50, int(left * 1000) + 1)))
        finally:
            lock._acquire_restore(state)  # type: ignore[attr-defined]
            dev._event_waiter = None
        if dev._failure is not None:  # failed meanwhile (BlkFront._fail forgot what was in flight)
            return
        lanes.settle_compiled(got)
        self._after_compiled(got, flags, sleeps, events)

    def _after_compiled(self, got: int, flags: int, sleeps: int, events: int, quiet: int = 0) -> None:
        """Under the device lock, after a compiled wait or stream call that reaped `got`
        responses (already settled) and returned `flags`; `sleeps` and `events`: the
        lanes' event_counts() before it, `quiet`: events it took quietly (they followed
        responses already reaped; counted for the storm logic). The counts, and what is
        the Python path's, handled as the completion thread would: a response the compiled
        reap left (judged by take_responses, which may fail the device with its rule), an
        event the Python handle must take or unmask, an event with nothing behind it
        (counted; a storm of them throttled, XSA-391)."""
        dev = self.dev
        lanes = self.lanes
        queue = lanes.queue
        lock = dev._lock
        after = lanes.event_counts()
        self.waits += after[0] - sleeps
        taken = after[1] - events
        self.events_taken += taken
        stats = dev.stats
        stats["events"] += taken
        stats["responses"] += got
        stats["spurious_events"] += quiet
        dev._spurious_streak += quiet
        self.polled += got
        if got:
            dev._spurious_streak = 0
        if flags & WAIT_STOP:  # the head is not a plain lane response: the Python path judges it
            dev._process(queue)
        ports: list[int] = []
        if flags & WAIT_SPURIOUS:
            stats["spurious_events"] += 1
            dev._spurious_streak += 1
        if flags & WAIT_EVTCHN:  # the handle's: pending() finds the port (its byte was rung back)
            ports = dev._pass(False, own=queue) or []
            self.events_taken += len(ports)
            if flags & WAIT_UNMASK:
                ports.append(queue.port)
        if ports or flags & WAIT_SPURIOUS:
            state = lock._release_save()  # type: ignore[attr-defined]
            try:
                dev._unmask_events(ports)  # sleeps first while events storm (XSA-391)
            finally:
                lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _wait_event(self, left: float | None) -> None:
        """Sleep on the event channel on the caller's thread (under the device lock, which
        the sleep releases): no completion thread is woken and no thread hands over to
        this one. Only while every request of the queue is the batch's (so no future's
        callback runs here); the completion thread leaves this queue and the events alone
        meanwhile (BlkFront._event_waiter), and still scans deadlines and xenstore. After
        the wake the events are handled as the completion thread does: pending ports, the
        queue's responses (what the compiled reap leaves is judged by the Python path and
        may fail the device with its rule), the final check, then the unmask (XSA-391
        throttle kept). Returns after an event or at most 50 ms (the caller re-checks)."""
        dev = self.dev
        lanes = self.lanes
        queue = lanes.queue
        if not lanes.compiled and dev._process(queue):  # the Python path: ring.h's final check
            return
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(dev._evtchn.fileno(), select.POLLIN)
        lock = dev._lock
        dev._event_waiter = self
        state = lock._release_save()  # type: ignore[attr-defined]
        try:
            self._poller.poll(50 if left is None else max(0, min(50, int(left * 1000) + 1)))
        finally:
            lock._acquire_restore(state)  # type: ignore[attr-defined]
            dev._event_waiter = None
        self.waits += 1
        ports = dev._pass(False, own=queue) or []
        self.events_taken += len(ports)
        if ports:
            state = lock._release_save()  # type: ignore[attr-defined]
            try:
                dev._unmask_events(ports)
            finally:
                lock._acquire_restore(state)  # type: ignore[attr-defined]

    def view(self, tag: int) -> memoryview:
        """The bytes of the last read on lane `tag` in its granted pages (no copy), valid
        until `tag` is submitted again."""
        return self.lanes.data(tag)

    def close(self, timeout: float | None = None) -> None:
        """Wait for what is in flight, then give the lanes' pages back to the pool."""
        if self.closed:
            return
        dev = self.dev
        with dev._lock:
            stream = self._stream
            if stream is not None and stream.owner != threading.get_ident():
                stream.closing = True  # read_many stops filling, drains and raises "batch.closed"
                self.lanes.give_way()
                while self._stream is stream:
                    self.cond.wait(1.0)
        try:
            while self.lanes.busy and dev._failure is None:
                self.reap(self.lanes.busy, timeout if timeout is not None else dev.config.request_timeout + 5)
        finally:
            with dev._lock:
                self.closed = True
                self.lanes.detach()
                if dev._failure is None and dev._connected and not self.lanes.busy:
                    for buf, start in self._runs:
                        buf.give(start, self._run_pages)  # zeroed (XSA-403)
                self._runs = []

    def __enter__(self) -> BatchIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
