"""One blkback ring (queue): map it, bind its event channel, serve its requests, pipelined.

Owns: `QueueWorker` (the ring, its event channel, its grant mapper and persistent-grant
cache, the ring thread that consumes requests and produces responses, and the I/O threads
that move data), `DeviceGate` (what lets a WRITE_BARRIER drain every queue), and
`connect_queue` errors as FeatureError with "frontend.*" rules.
With --fault (blkback_faults) the lines marked FAULT HOOK misbehave on purpose; a queue
built without faults runs none of them.
Must not: touch xenstore or decide the device's xenbus state: a fatal ring violation is
reported to the owner through `on_fatal` and the owner closes the device.

The ring thread (ring.h's consumer loop, one notification per batch):
- reads req_prod once (BackRing.unconsumed_requests, which also rejects an overflowing
  producer: RING_REQUEST_PROD_OVERFLOW is fatal for the ring), copies each slot once
  (XSA-155), judges it (blkback_validate; every verdict is counted in `_judge`/`_reject`,
  the one place requests are accepted or rejected), maps its grants (from the
  persistent-grant cache, or without persistent grants one map per direction for the whole
  batch) and builds its iovec (memoryview slices of the mapped pages, no copy);
- moves the data of a request of more than `inline_bytes` itself unless the kernel says
  that would wait for the disk (preadv2/pwritev2 RWF_NOWAIT), and then hands it to the I/O
  threads (preadv/pwritev straight into the granted pages; the GIL is released during the
  system call, so several requests of one ring wait for the disk at once and overlap with
  the ring thread's work). Handing page-cache hits over was measured slower (software Xen
  bench; nested bench, one-vCPU dom0, Linux blkfront 1 MiB reads: 4.8 MB/s with all but
  one request of a batch handed over, 11.1 MB/s serial, 10.5 MB/s this way): a thread
  hand-over costs more than the copy. Where the kernel cannot tell, the data is moved here.
  Smaller requests, discards and flushes run on the ring thread;
- takes completions as they come (an eventfd wakes it), unmaps what the request mapped for
  itself, writes the response (struct packed from zero bytes, XSA-216): responses leave in
  completion order, which blkif allows (the id names the request). A grant is never still
  mapped when its response is published (XSA-396): a batch mapping shared by several
  requests (no persistent grants) holds their responses back until it is unmapped;
- with the compiled ring loop (blkback_ringloop, built at install; persistent grants, no
  --fault), hands the batch to it first: it serves the plainly valid READ/WRITE requests
  (direct or indirect) whose refs are all cached (checks; reads copied from mapped windows of
  a regular image file where blkback_ringloop.choose_reads measured them clearly faster than
  preadv, else preadv, writes pwritev, straight into or from the cached pages;
  the response) and stops at the first other one, which this thread judges and answers as
  above (`_serve_compiled`); what it served is counted in the report as accepted;
- publishes responses and notifies if the frontend asked (RING_PUSH_RESPONSES_AND_CHECK_
  NOTIFY), then RING_FINAL_CHECK_FOR_REQUESTS before sleeping;
- with the compiled loop on direct event channels (the software Xen's words, or real Xen's
  libxenevtchn handle: EventChannels.direct_link), sleeps in the compiled wait loop instead
  (`_wait_compiled`, blkback_ringloop.c's xt_wait): it takes and unmasks the ring's events,
  serves, publishes every DEFAULT_PUBLISH_EVERY responses (or
  PUBLISH_BYTES) so the frontend reaps while the rest are served, and notifies, with no
  Python between wake-ups; it returns here for whatever is Python's (a request it leaves, an
  I/O completion, a stop, a barrier on another queue: DeviceGate wakes every queue, the
  event channel needing the Python handle, the re-check interval).
The ring never holds more requests in flight than it has slots (BackRing counts consumed
requests without a response). An event with no work is harmless. Without a platform full
barrier the ring is also re-checked every POLL_INTERVAL seconds.

Ordering: FLUSH_DISKCACHE waits until every earlier request of its ring has completed, then
fdatasync. WRITE_BARRIER takes the DeviceGate: it waits until no request of ANY queue is in
flight ("drain in flight, then fdatasync"), writes its data, syncs, and no later request of
any queue starts before it is done. The persistent-grant cache is used by the ring thread
only, and never evicts a ref that a request in flight still uses.
"""

from __future__ import annotations

import errno
import logging
import os
import queue as queues
import select
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from xentools.core.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    PAGE_SIZE,
    Abi,
    codec_for,
)
from xentools.core.errors import FeatureError, RingError
from xentools.core.ring import BackRing, SharedRing, ring_entries
from xentools.devices.blkback_conformance import FrontendLog
from xentools.devices.blkback_faults import FaultSet
from xentools.devices.blkback_grants import DEFAULT_MAX_PERSISTENT_GRANTS, PageSet, SegmentMapper
from xentools.devices.blkback_image import ImageFile
from xentools.devices.blkback_ringloop import (
    STOP_RING,
    WAIT_EVTCHN,
    WAIT_NOTIFY,
    WAIT_UNMASK,
    WAIT_WAKE,
    CompiledRing,
    GrefTable,
    compiled,
)
from xentools.devices.blkback_validate import (
    Plan,
    RequestPolicy,
    RequestRejected,
    parse_indirect_segments,
    parse_request,
)
from xentools.platform.interface import (
    EventChannelError,
    GrantError,
    MappedPages,
    Platform,
    PlatformError,
)

__all__ = [
    "BATCH_MAP_REFS", "DEFAULT_INLINE_BYTES", "DEFAULT_IO_THREADS", "IDLE_RECHECK", "POLL_INTERVAL",
    "DeviceGate", "QueueWorker",
]

log = logging.getLogger("xentools.blkback")

POLL_INTERVAL = 0.5  # seconds between ring re-checks without a full barrier
IDLE_RECHECK = 2.0  # seconds between ring re-checks with one
BATCH_MAP_REFS = 1024  # refs in one platform map call for a batch of requests
DEFAULT_IO_THREADS = 4  # I/O threads per ring
# Data requests up to this size run on the ring thread: from the page cache, a 4 KiB pread
# costs less than handing it to another thread and back (measured; see the bench).
DEFAULT_INLINE_BYTES = 16 * 1024
# The compiled wait loop publishes responses (and notifies, if asked) every this many
# requests, so the frontend reaps and refills while the rest are served (0: once per round
# of the ring; -1: no compiled wait loop, the Python one).
DEFAULT_PUBLISH_EVERY = 8
PUBLISH_BYTES = 256 * 1024  # or once the requests served moved this many bytes



class DeviceGate:
    """One lock per queue, held while that queue has any request in flight, and a barrier
    path that takes all of them (so it runs when no queue has anything in flight, and no
    queue starts a request until it is done).

    A queue's lock is taken when its first request starts and released, possibly by an I/O
    thread, when its last one completes (`QueueWorker._begin`/`_end`).
    """

    def __init__(self, queues: int) -> None:
        self.locks = [threading.Lock() for _ in range(queues)]
        self._barrier = threading.Lock()
        # True while a barrier waits or runs: queues then stop adding requests to those in
        # flight, so the barrier cannot be starved by a queue that is never idle.
        self.pending = False
        # Wakes a queue's ring thread out of a compiled wait (which holds the queue's lock
        # while it serves): each queue adds its own when it starts, removes it before its
        # descriptors close (under _wakers_lock: no wake-up writes to a closed descriptor).
        self.wakers: list[Callable[[], None]] = []
        self._wakers_lock = threading.Lock()

    def add_waker(self, wake: Callable[[], None]) -> None:
        with self._wakers_lock:
            self.wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        with self._wakers_lock:
            if wake in self.wakers:
                self.wakers.remove(wake)

    def acquire_all(self) -> None:
        self._barrier.acquire()  # one barrier at a time: no two threads take locks out of order
        self.pending = True
        with self._wakers_lock:
            for wake in self.wakers:
                wake()
        for lock in self.locks:
            lock.acquire()

    def wait_barrier(self) -> None:
        """Return once no barrier waits or runs (a queue that would hold its lock while it
        sleeps waits here instead, without its lock, so the barrier gets it)."""
        with self._barrier:
            pass

    def release_all(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.pending = False
        self._barrier.release()


class _BatchMap:
    """A mapping shared by several requests of a batch (no persistent grants): unmapped when
    the last of them completes, and only then are their responses written (XSA-396)."""

    __slots__ = ("mapped", "pending", "answers")

    def __init__(self, mapped: MappedPages, pending: int) -> None:
        self.mapped = mapped
        self.pending = pending
        self.answers: list[tuple[int, int, int]] = []


class _Job:
    """A data request handed to an I/O thread: what to move, and what to release after."""

    __slots__ = ("plan", "pages", "group", "iov", "status")

    def __init__(self, plan: Plan, pages: PageSet, group: _BatchMap | None, iov: list[memoryview]) -> None:
        self.plan = plan
        self.pages = pages
        self.group = group
        self.iov = iov
        self.status = BLKIF_RSP_ERROR


class QueueWorker:
    """Serves queue `index` of a connected frontend. Create, then start(); stop() is
    idempotent and releases everything (ring unmapped, port unbound, grants unmapped) once
    no I/O is in flight."""

    def __init__(
        self,
        *,
        index: int,
        platform: Platform,
        frontend_id: int,
        ring_refs: tuple[int, ...],
        event_channel: int,
        abi: Abi,
        policy: RequestPolicy,
        image: ImageFile,
        gate: DeviceGate,
        log_to: FrontendLog,
        persistent: bool,
        max_persistent: int = DEFAULT_MAX_PERSISTENT_GRANTS,
        on_fatal: Callable[[QueueWorker, str], None] | None = None,
        io_threads: int = DEFAULT_IO_THREADS,
        inline_bytes: int = DEFAULT_INLINE_BYTES,
        faults: FaultSet | None = None,
        ringloop: bool = True,
        publish_every: int = DEFAULT_PUBLISH_EVERY,
    ) -> None:
        self.index = index
        self.frontend_id = frontend_id
        self.policy = policy
        self.faults = faults or None  # FAULT HOOK (--fault): None when serving honestly
        self.image = faults.image(image) if self.faults else image  # FAULT HOOK: read data
        self.gate = gate
        self.lock = gate.locks[index]
        self.report = log_to
        self.on_fatal = on_fatal
        self.codec = codec_for(abi)
        self.fatal: str | None = None
        self.served = 0
        self.compiled_served = 0  # of them, served by the compiled ring loop
        self.max_in_flight = 0  # most requests of this ring in flight at once (for tests)
        # Where the ring thread's time goes (logged when the queue stops; the bench reads it):
        # passes of its wait loop, calls into the compiled loop, events sent, its CPU time.
        self.wakeups = 0
        self.loop_calls = 0
        self.notifies = 0
        self.thread_cpu = 0.0
        self.io_threads = io_threads
        self.inline_bytes = inline_bytes if io_threads else 1 << 62
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io: list[threading.Thread] = []
        self._jobs: queues.SimpleQueue[_Job | None] = queues.SimpleQueue()
        self._done: deque[_Job] = deque()  # completed by I/O threads, not yet answered
        self._answers: list[tuple[int, int, int]] = []  # responses to write, in order
        self._count_lock = threading.Lock()
        self._in_flight = 0  # requests begun and not ended (guards the gate lock)
        self._queued = 0  # jobs handed to I/O threads and not yet taken back
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.publish_every = publish_every
        self._done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._gnttab = platform.open_gnttab()
        self._evtchn = None
        self._ring_pages: MappedPages | None = None
        self._fast: CompiledRing | None = None  # the compiled ring loop, when used
        self.port: int | None = None
        try:
            order = len(ring_refs).bit_length() - 1
            nr_ents = ring_entries(order, abi.entry_size)
            try:
                self._ring_pages = self._gnttab.map(frontend_id, ring_refs, True)
            except GrantError as err:
                raise FeatureError(
                    "frontend.ring-ref.unmappable", f"queue {index}: ring refs {list(ring_refs)}: {err}"
                ) from None
            shared = SharedRing(self._ring_pages.buf, abi.entry_size, nr_ents)
            self.ring = BackRing(shared, platform.full_barrier)
            # Without a full barrier our final check may miss a request published meanwhile
            # (see ring.py): poll often. With one, an occasional re-check costs nothing and
            # bounds the damage of an event lost anywhere on the way.
            self._poll = IDLE_RECHECK if platform.full_barrier is not None else POLL_INTERVAL
            self._evtchn = platform.open_evtchn()
            try:
                self.port = self._evtchn.bind_interdomain(frontend_id, event_channel)
            except EventChannelError as err:
                raise FeatureError(
                    "frontend.event-channel.unbindable", f"queue {index}: port {event_channel}: {err}"
                ) from None
            self.mapper = SegmentMapper(
                self._gnttab, frontend_id, persistent=persistent, max_persistent=max_persistent
            )
            if self.faults is not None:  # FAULT HOOK: grants kept mapped after the response
                self.mapper = self.faults.mapper(self.mapper)
            # The loop moves data with the image's descriptor itself: only for a plain
            # ImageFile (a subclass may change how data moves, as the tests' slow image does).
            plain = type(self.image) is ImageFile
            module = compiled() if ringloop and persistent and plain and self.faults is None else None
            if module is not None:
                table = GrefTable(module, max_persistent)
                self.mapper.table = table
                self._fast = CompiledRing(
                    module, abi, disk_bytes=policy.disk_bytes, unit=policy.unit, readonly=policy.readonly,
                    max_indirect_segments=policy.max_indirect_segments,
                    table=table, ring_buf=self._ring_pages.buf, nr_ents=nr_ents, fd=self.image.fd,
                    inline_bytes=self.inline_bytes,
                )
        except BaseException:
            self._release()
            raise

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        for number in range(self.io_threads):
            thread = threading.Thread(
                target=self._io_main, name=f"blkback-io-{self.index}.{number}", daemon=True
            )
            thread.start()
            self._io.append(thread)
        self.gate.add_waker(self._wake)
        self._thread = threading.Thread(target=self._thread_main, name=f"blkback-queue-{self.index}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and release the ring, port and grants. Waits for the ring thread,
        which first waits for every request in flight (nothing is unmapped under an I/O)."""
        self._stop.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("queue %d did not stop within %.0f s", self.index, timeout)
                return  # leave its resources alone rather than unmap under a live thread
        self.gate.remove_waker(self._wake)
        io, self._io = self._io, []
        for _ in io:
            self._jobs.put(None)
        for worker in io:
            worker.join(timeout)
        if self.served:
            log.info("queue %d: %d requests served, %d of them by the compiled ring loop%s", self.index,
                     self.served, self.compiled_served, "" if self._fast is not None else " (not used)")
            fast = self._fast.profile if self._fast is not None else {"mapped_reads": 0, "loop_s": 0.0, "io_s": 0.0}
            log.info("queue %d: profile: %d wake-ups, %d compiled-loop calls, %d notifies, ring thread CPU %.3f s, "
                     "in the compiled loop %.3f s (moving data of large requests %.3f s), %d reads from mapped windows",
                     self.index, self.wakeups, self.loop_calls, self.notifies, self.thread_cpu,
                     fast["loop_s"], fast["io_s"], fast["mapped_reads"])
            if self._fast is not None:
                log.info("queue %d: compiled wait loop: %s; reads: %s", self.index, self._fast.wait_profile,
                         self._fast.reads)
        self._release()

    @property
    def compiled(self) -> bool:
        """True when this ring is served through the compiled ring loop."""
        return self._fast is not None

    def _release(self) -> None:
        fast, self._fast = self._fast, None  # never called again: the ring is unmapped below
        if fast is not None:
            fast.close()  # its windows of the image
        mapper = getattr(self, "mapper", None)
        if mapper is not None:
            try:
                mapper.close()
            except PlatformError as err:
                log.warning("queue %d: unmapping persistent grants: %s", self.index, err)
        if self._evtchn is not None:
            try:
                self._evtchn.close()  # unbinds the port
            except PlatformError as err:
                log.warning("queue %d: closing the event channel: %s", self.index, err)
            self._evtchn = None
        if self._ring_pages is not None:
            pages, self._ring_pages = self._ring_pages, None
            try:
                self._gnttab.unmap(pages)
            except PlatformError as err:
                log.warning("queue %d: unmapping the ring: %s", self.index, err)
        if self._gnttab is not None:
            try:
                self._gnttab.close()
            except PlatformError as err:
                log.warning("queue %d: closing the grant handle: %s", self.index, err)
            self._gnttab = None  # type: ignore[assignment]
        for fd in (self._wake_r, self._wake_w, self._done_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = self._done_fd = -1

    # -- the ring thread --------------------------------------------------------------------------

    def _thread_main(self) -> None:
        evtchn = self._evtchn
        assert evtchn is not None and self.port is not None
        # poll(2) directly: a selector builds objects on every wake-up, and each costs (Python
        # runs about 18 times slower in a nested dom0 than on its host).
        poller = select.poll()
        done_fd = self._done_fd
        for fd in (evtchn.fileno(), self._wake_r, done_fd):
            poller.register(fd, select.POLLIN)
        timeout_ms = int(self._poll * 1000)
        cpu_start = time.thread_time()
        try:
            while not self._stop.is_set():
                # Take and unmask the pending event first: a notify that arrives while we
                # work is then delivered again, and the ring is checked once more. This
                # handle has one port: one event taken per pass (another one still pending
                # leaves the descriptor readable).
                port = evtchn.pending()
                if port is not None:
                    evtchn.unmask(port)
                self._serve_ring()
                if self.fatal is not None:
                    return
                if self._direct_events():
                    self._wait_compiled(timeout_ms)
                    continue
                events = poller.poll(timeout_ms)
                self.wakeups += 1
                for fd, _ in events:
                    if fd == done_fd:
                        self._clear_done_fd()
                    elif fd == self._wake_r:  # a stop, or a barrier elsewhere
                        self._clear_wake_fd()
        except RingError as err:
            self._fail(err.rule, str(err), violation=True)
        except PlatformError as err:
            self._fail("backend.platform", f"queue {self.index}: {err}", violation=False)
        except Exception as err:  # a bug here must not take the other queues down
            log.exception("queue %d failed", self.index)
            self._fail("backend.internal", f"queue {self.index}: {type(err).__name__}: {err}", violation=False)
        finally:
            self._drain()
            self.thread_cpu = time.thread_time() - cpu_start

    def _direct_events(self) -> bool:
        """True when the compiled loop may take, unmask and send this ring's events itself
        (EventChannels.direct_link: the software Xen's words, or real Xen's libxenevtchn
        handle, whose only port is this ring's; no --fault): its link is (re)attached here
        whenever the handle's links changed. The handle is closed only after this thread
        ended (stop, then _release), so the compiled loop never uses a freed one."""
        fast = self._fast
        if fast is None or self.faults is not None or self.publish_every < 0:
            return False
        evtchn = self._evtchn
        if evtchn is None:
            return False
        changed = evtchn.links_changed
        if changed != fast.link_generation or not fast.events_attached:
            link = evtchn.direct_link(self.port)  # type: ignore[arg-type]
            if link is None:
                fast.detach_events()
                fast.link_generation = changed
                return False
            fast.attach_events(link, (self._wake_r, self._done_fd))
        return True

    def _wait_compiled(self, timeout_ms: int) -> None:
        """Serve in the compiled wait loop (xt_wait: sleep on the event channel, take and
        unmask events, serve, publish every `publish_every` responses, notify) until
        something is Python's: a request it leaves (the next _serve_ring takes it), an I/O
        completion or a stop or a barrier elsewhere (a wake fd), the timeout, or the event
        channel needing the Python handle."""
        fast = self._fast
        assert fast is not None
        if self.gate.pending:  # a barrier elsewhere wants every queue's lock: it goes first
            self.gate.wait_barrier()
            return
        self._begin()  # the gate lock while it serves (a barrier elsewhere wakes it: _wake)
        try:
            served, _stop, flags = fast.wait(self.ring, timeout_ms, self.publish_every, PUBLISH_BYTES)
        finally:
            self._end()
        self.loop_calls += 1
        self.wakeups += 1
        if served:
            self.served += served
            self.compiled_served += served
            for wire_op, op, count, segments, nbytes in fast.take_stats():
                self.report.accepted(wire_op, op, segments, nbytes, count=count)
        if flags & WAIT_UNMASK:
            self._evtchn.unmask(self.port)  # type: ignore[union-attr]
        if flags & WAIT_EVTCHN:
            foreign = fast.take_foreign()  # real Xen: another port's event, taken: unmasked as pending() would be
            if foreign is not None:
                self._evtchn.unmask(foreign)  # type: ignore[union-attr]
        if flags & WAIT_NOTIFY:
            self._notify()
        if flags & WAIT_WAKE:
            self._clear_done_fd()
            self._clear_wake_fd()

    def _clear_wake_fd(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def _wake(self) -> None:
        """Wake the ring thread out of a wait (a stop, or a barrier on another queue)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _clear_done_fd(self) -> None:
        try:
            os.eventfd_read(self._done_fd)
        except BlockingIOError:
            pass

    def _drain(self) -> None:
        """Wait for every job handed to the I/O threads and release what they used, so that
        nothing is unmapped under an I/O. Their responses are still written (the ring stays
        mapped until _release) unless the ring is broken."""
        while self._queued:
            sel = selectors.DefaultSelector()
            try:
                sel.register(self._done_fd, selectors.EVENT_READ)
                if not self._done:
                    sel.select(1.0)
            finally:
                sel.close()
            self._clear_done_fd()
            try:
                self._reap()
            except PlatformError as err:
                log.warning("queue %d: releasing grants after I/O: %s", self.index, err)
        if self.fatal is None:
            try:
                self._publish()
            except (RingError, PlatformError) as err:
                log.info("queue %d: last responses not written: %s", self.index, err)

    def _fail(self, rule: str, message: str, *, violation: bool) -> None:
        if self._stop.is_set() and not violation:
            return  # stopping: handles were closed under us
        self.fatal = message
        if violation:
            self.report.record(rule, message)
        log.error("queue %d stops: %s", self.index, message)
        if self.on_fatal is not None:
            self.on_fatal(self, message)

    def _serve_ring(self) -> None:
        if self._fast is not None:
            self._serve_compiled()
            return
        ring = self.ring
        get = ring.get_request
        while not self._stop.is_set():
            if self._done:
                self._reap()
            if self.faults is not None and self.faults.halted(self.index):
                return  # FAULT HOOK: past an unsolicited response, nothing more is served
            available = ring.unconsumed_requests()  # RingError on overflow: fatal
            if available:
                slots = [get() for _ in range(available)]  # one private copy each (XSA-155)
                self._serve_batch(slots)
                self.served += available
            if self._answers or (self.faults is not None and self.faults.due(self.index)):
                self._publish()  # FAULT HOOK: a duplicate's held answer may be due alone
            if not available:
                if self._done or ring.final_check_for_requests():
                    continue
                return

    def _serve_compiled(self) -> None:
        """The ring through the compiled loop's pass (xt_pass: serve, publish the responses,
        arm req_event); each request it leaves goes through the Python path (_serve_batch),
        one at a time, before the next pass. Responses keep the order of the requests."""
        fast, ring = self._fast, self.ring
        assert fast is not None
        while not self._stop.is_set():
            if self._done:
                self._reap()
            if self._answers:
                self._write_answers()  # earlier answers first: the pass publishes them
            self._begin()
            try:
                served, stop, notify = fast.run(ring)
                self.loop_calls += 1
            finally:
                self._end()
            if served:
                self.served += served
                self.compiled_served += served
            if notify:
                self._notify()
            if stop:
                # STOP_RING: the producer overflowed (BackRing says so: fatal); STOP_PYTHON:
                # judged and answered here; STOP_WAIT: mapped here and handed to an I/O
                # thread; STOP_ERROR: redone here, which logs and answers the error.
                if ring.unconsumed_requests() and stop != STOP_RING:  # RingError on overflow
                    self._serve_batch([ring.get_request()])
                    self.served += 1
                continue
            if not (self._done or self._answers):
                break
        for wire_op, op, count, segments, nbytes in fast.take_stats():
            self.report.accepted(wire_op, op, segments, nbytes, count=count)

    def _write_answers(self) -> None:
        answers, self._answers = self._answers, []
        put = self.ring.put_response
        pack = self.codec.response.pack
        for req_id, rsp_op, status in answers:
            put(pack(req_id, rsp_op, status))

    def _publish(self) -> None:
        """Write the answers gathered so far, publish them, notify if the frontend asked."""
        if self.faults is None:
            self._write_answers()
        else:  # FAULT HOOK: the responses the guest is told
            answers, self._answers = self._answers, []
            answers = self.faults.responses(self.index, answers, self._stop)
            put = self.ring.put_response
            pack = self.codec.response.pack
            for req_id, rsp_op, status in answers:
                put(pack(req_id, rsp_op, status))
        if self.faults is not None:  # FAULT HOOK: publishes, and may misbehave around that
            self.faults.push(self.index, self.ring, pack, self._notify)
        elif self.ring.push_responses_and_check_notify():
            self._notify()

    def _notify(self) -> None:
        self.notifies += 1
        try:  # a failure means the frontend closed its end; the owner sees the state change
            self._evtchn.notify(self.port)  # type: ignore[union-attr]
        except EventChannelError as err:
            log.info("queue %d: notify failed: %s", self.index, err)

    def _reap(self) -> None:
        """Answers for the jobs the I/O threads completed (ring thread only)."""
        done = self._done
        answers = self._answers
        while done:
            job = done.popleft()
            self._queued -= 1
            plan = job.plan
            answer = (plan.id, plan.rsp_operation, job.status)
            group = job.group
            if group is None:
                self.mapper.release(job.pages)  # before the response (XSA-396)
                answers.append(answer)
                continue
            group.answers.append(answer)
            group.pending -= 1
            if group.pending == 0:
                self.mapper.unmap(group.mapped)
                answers.extend(group.answers)

    # -- in flight: the gate --------------------------------------------------------------------

    def _begin(self) -> None:
        """A request of this ring starts: the first one takes the queue's gate lock (waiting
        for a barrier elsewhere to finish). Ring thread only."""
        with self._count_lock:
            if self._in_flight and not self.gate.pending:
                self._in_flight += 1
                if self._in_flight > self.max_in_flight:
                    self.max_in_flight = self._in_flight
                return
        # Nothing in flight (or a barrier waits: then let what is in flight finish first).
        # The lock is held exactly while requests are in flight, and only this thread adds
        # requests, so once we hold it the count is zero.
        self.lock.acquire()
        with self._count_lock:
            self._in_flight = 1
            if not self.max_in_flight:
                self.max_in_flight = 1

    def _end(self) -> None:
        """A request of this ring completed (any thread): the last one frees the gate."""
        with self._count_lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.lock.release()

    # -- the I/O threads ----------------------------------------------------------------------------

    def _io_main(self) -> None:
        jobs, done, image = self._jobs, self._done, self.image
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                plan = job.plan
                if plan.operation == BLKIF_OP_READ:
                    image.readv(job.iov, plan.offset, plan.nbytes)
                else:
                    image.writev(job.iov, plan.offset, plan.nbytes)
                job.status = BLKIF_RSP_OKAY
            except OSError as err:
                # The image failed (EIO, ENOSPC): an error for this request, not the frontend's.
                log.error("queue %d: image I/O failed: %s", self.index, err)
                job.status = BLKIF_RSP_ERROR
            except Exception:  # never lose a job: the ring thread waits for each one
                log.exception("queue %d: I/O thread", self.index)
                job.status = BLKIF_RSP_ERROR
            finally:
                job.iov = []
                done.append(job)  # before _end: whoever waits on the gate then finds it here
                self._end()
                try:
                    os.eventfd_write(self._done_fd, 1)
                except OSError:
                    pass

    # -- one batch ------------------------------------------------------------------------------

    def _judge(self, slot: bytes) -> Plan | None:
        """Parse and check one slot: the Plan of a request to run, or None after answering
        it with the status of the first rule it broke (counted in _reject)."""
        try:
            plan = parse_request(slot, self.codec, self.policy)
            if plan.operation == BLKIF_OP_INDIRECT:
                plan = self._resolve_indirect(plan)
        except RequestRejected as err:
            _, req_id, rsp_op = self.codec.header(slot)
            self.report.rejected(rsp_op)
            self._reject(err, req_id, rsp_op)
            return None
        self.report.accepted(slot[0], plan.rsp_operation, len(plan.grefs), plan.nbytes)
        return plan

    def _reject(self, err: RequestRejected, req_id: int, rsp_op: int) -> None:
        """Count the broken rule and answer the request with its status (the one place a
        request is rejected)."""
        self.report.record(err.rule, str(err))
        self._answers.append((req_id, rsp_op, err.status))

    def _serve_batch(self, slots: list[bytes]) -> None:
        """Judge, map and start every slot; answers of requests run here, or rejected, are
        gathered in self._answers; the others come back through self._done."""
        plans = [self._judge(slot) for slot in slots]
        # A flush or barrier ends a run: requests after it do not share a mapping (and so
        # a held-back response) with requests before it.
        start = 0
        for index, plan in enumerate(plans):
            if plan is not None and plan.operation in (BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
                self._start_run(plans[start:index])
                self._start_request(plan, None)
                start = index + 1
        self._start_run(plans[start:])

    def _start_run(self, plans: Sequence[Plan | None]) -> None:
        groups: dict[int, tuple[PageSet, _BatchMap]] = {}
        if not self.mapper.persistent and len(plans) > 1:
            self._premap(plans, groups)
        for index, plan in enumerate(plans):
            if plan is not None:
                self._start_request(plan, groups.get(index))

    def _premap(self, plans: Sequence[Plan | None], groups: dict[int, tuple[PageSet, _BatchMap]]) -> None:
        """Without persistent grants, map the data pages of many requests with one platform
        call per direction (READ pages writable, the others read-only) instead of one map
        and one unmap per request. A chunk with a ref that cannot be mapped is left to the
        requests themselves, so only the bad request fails."""
        for writable in (True, False):
            group = [
                (index, plan.grefs) for index, plan in enumerate(plans)
                if plan is not None and plan.grefs and (plan.operation == BLKIF_OP_READ) is writable
            ]
            if len(group) < 2:
                continue
            chunk: list[tuple[int, tuple[int, ...]]] = []
            count = 0
            for item in group + [(-1, ())]:
                if chunk and (item[0] < 0 or count + len(item[1]) > BATCH_MAP_REFS):
                    if len(chunk) > 1:
                        result = self.mapper.map_many([grefs for _, grefs in chunk], writable)
                        if result is not None:
                            sets, mapped = result
                            shared = _BatchMap(mapped, len(chunk))
                            for (index, _), pages in zip(chunk, sets):
                                groups[index] = (pages, shared)
                    chunk, count = [], 0
                chunk.append(item)
                count += len(item[1])

    # -- one request --------------------------------------------------------------------------

    def _start_request(self, plan: Plan, premapped: tuple[PageSet, _BatchMap] | None) -> None:
        """Run a valid-looking request here, or hand it to an I/O thread."""
        op = plan.operation
        group = premapped[1] if premapped is not None else None
        if op == BLKIF_OP_WRITE_BARRIER or op == BLKIF_OP_FLUSH_DISKCACHE:
            # A barrier waits for every queue, a flush for its own ring: taking the gate
            # lock(s) returns once every earlier request has completed.
            if op == BLKIF_OP_WRITE_BARRIER:
                self.gate.acquire_all()
            else:
                self.lock.acquire()
            try:
                self._reap()  # answer what completed before it first: responses keep the order
                status = self._run_here(plan, premapped)
            finally:
                if op == BLKIF_OP_WRITE_BARRIER:
                    self.gate.release_all()
                else:
                    self.lock.release()
            self._answer_here(plan, status, group)
            return
        if not plan.grefs or plan.nbytes <= self.inline_bytes:
            self._begin()
            try:
                status = self._run_here(plan, premapped)
            finally:
                self._end()
            self._answer_here(plan, status, group)
            return
        # A large data request: map here; move the data here if that needs no waiting (the
        # page cache has it), else on an I/O thread while this one goes on.
        try:
            pages = premapped[0] if premapped is not None else self._map(plan)
        except RequestRejected as err:
            self._reject(err, plan.id, plan.rsp_operation)
            return
        iov = self._iov(plan, pages)
        self._begin()
        try:
            if plan.operation == BLKIF_OP_READ:
                done = self.image.try_readv(iov, plan.offset, plan.nbytes)
            else:
                done = self.image.try_writev(iov, plan.offset, plan.nbytes)
            status = BLKIF_RSP_OKAY
        except OSError as err:
            log.error("queue %d: image I/O failed: %s", self.index, err)
            done, status = True, BLKIF_RSP_ERROR
        if not done:
            self._queued += 1
            self._jobs.put(_Job(plan, pages, group, iov))
            return
        self._end()
        if premapped is None:
            self.mapper.release(pages)  # before the response (XSA-396)
        self._answer_here(plan, status, group)

    def _answer_here(self, plan: Plan, status: int | RequestRejected, group: _BatchMap | None) -> None:
        if isinstance(status, RequestRejected):
            self._reject(status, plan.id, plan.rsp_operation)
            answer = None
        else:
            answer = (plan.id, plan.rsp_operation, status)
        if group is None:
            if answer is not None:
                self._answers.append(answer)
            return
        group.pending -= 1
        if answer is not None:
            group.answers.append(answer)
        if group.pending == 0:
            self.mapper.unmap(group.mapped)
            self._answers.extend(group.answers)

    def _run_here(self, plan: Plan, premapped: tuple[PageSet, _BatchMap] | None) -> int | RequestRejected:
        """Status of one request run on the ring thread (the caller holds the gate), or the
        RequestRejected to answer it with."""
        try:
            return self._execute(plan, premapped[0] if premapped is not None else None)
        except RequestRejected as err:
            return err
        except OSError as err:
            # The image failed (EIO, ENOSPC): an error for this request, not the frontend's.
            log.error("queue %d: image I/O failed: %s", self.index, err)
            return BLKIF_RSP_ERROR

    def _map(self, plan: Plan) -> PageSet:
        writable = plan.operation == BLKIF_OP_READ  # we write into the frontend's pages only for READ
        try:
            return self.mapper.map(plan.grefs, writable)
        except GrantError as err:
            raise RequestRejected("segment.gref_unmappable", f"request {plan.id}: {err}") from None

    def _execute(self, plan: Plan, premapped: PageSet | None) -> int:
        op = plan.operation
        image = self.image
        if op == BLKIF_OP_DISCARD:
            if self._fast is not None:  # holes follow: no mapped window over them
                self._fast.forget(plan.offset, plan.nbytes)
            try:
                image.punch_hole(plan.offset, plan.nbytes)
            except OSError as err:
                if err.errno == errno.EOPNOTSUPP:  # the filesystem cannot deallocate
                    return BLKIF_RSP_EOPNOTSUPP
                raise
            return BLKIF_RSP_OKAY
        if op == BLKIF_OP_WRITE_BARRIER:
            image.flush()  # every earlier write is complete (all queues drained) and durable
        if plan.grefs:
            pages = premapped if premapped is not None else self._map(plan)
            try:
                iov = self._iov(plan, pages)
                if op == BLKIF_OP_READ:
                    image.readv(iov, plan.offset, plan.nbytes)
                else:
                    image.writev(iov, plan.offset, plan.nbytes)
            finally:
                if premapped is None:
                    self.mapper.release(pages)
        if op == BLKIF_OP_FLUSH_DISKCACHE or op == BLKIF_OP_WRITE_BARRIER:
            image.flush()
        return BLKIF_RSP_OKAY

    def _resolve_indirect(self, plan: Plan) -> Plan:
        grefs = plan.indirect_grefs
        try:
            pages = self.mapper.map(grefs, False)
        except GrantError as err:
            raise RequestRejected("indirect.gref_unmappable", f"request {plan.id}: {err}") from None
        try:
            if pages.contiguous is not None:
                buf = pages.contiguous
                views = [buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(len(grefs))]
            else:
                views = pages.views
            return parse_indirect_segments(plan, views, self.policy)
        finally:
            self.mapper.release(pages)

    def _iov(self, plan: Plan, pages) -> list[memoryview]:  # type: ignore[no-untyped-def]
        unit = self.policy.unit
        firsts, lasts = plan.firsts, plan.lasts
        n = len(firsts)
        buf = pages.contiguous
        whole = firsts.count(0) == n and lasts.count(self.policy.units_per_page - 1) == n
        if buf is None:
            views = pages.views
            if whole:
                return views
            return [views[i][firsts[i] * unit : (lasts[i] + 1) * unit] for i in range(n)]
        if whole:
            return [buf[: n * PAGE_SIZE]]  # whole pages, back to back: one buffer
        iov = []
        start = end = -1
        base = 0
        for i in range(n):
            s = base + firsts[i] * unit
            if s != end:
                if end >= 0:
                    iov.append(buf[start:end])
                start = s
            end = base + (lasts[i] + 1) * unit
            base += PAGE_SIZE
        iov.append(buf[start:end])
        return iov
