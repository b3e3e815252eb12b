"""One blkback ring (queue): map it, bind its event channel, serve its requests in a thread.

Owns: `QueueWorker` (the ring, its event channel, its grant mapper and persistent-grant
cache, and the thread that consumes requests and produces responses), `DeviceGate` (the
locks that let a WRITE_BARRIER drain every queue), and `connect_queue` errors as
FeatureError with "frontend.*" rules.
Must not: touch xenstore or decide the device's xenbus state: a fatal ring violation is
reported to the owner through `on_fatal` and the owner closes the device.

How a batch is served (ring.h's consumer loop, one notification per batch):
- read req_prod once (BackRing.unconsumed_requests, which also rejects an overflowing
  producer: RING_REQUEST_PROD_OVERFLOW is fatal for the ring), copy each slot once
  (XSA-155), judge it (blkback_validate), map its grants (from the persistent-grant cache,
  or without persistent grants one map per direction for the whole batch), move the data
  straight between the image file and the mapped pages (preadv/pwritev on memoryview
  slices, no copy), unmap everything the batch mapped, then write the responses (struct
  packed from zero bytes, XSA-216): a grant is never still mapped when its response is
  published, so the frontend may revoke it at once (XSA-396);
- publish the batch's responses and notify if the frontend asked (RING_PUSH_RESPONSES_AND_
  CHECK_NOTIFY), then RING_FINAL_CHECK_FOR_REQUESTS before sleeping on the event channel.
An event with no work is harmless (event storms cost one check each). Without a platform
full barrier the ring is also re-checked every POLL_INTERVAL seconds.

Requests of one ring complete in ring order, one at a time: there is never more than one
request of a ring in flight. A WRITE_BARRIER takes every queue's lock, so when it runs no
request of any queue is in flight ("drain in flight, then fdatasync").
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import threading
from collections.abc import Callable

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
)
from xentools.core.errors import FeatureError, RingError
from xentools.core.ring import BackRing, SharedRing, ring_entries
from xentools.devices.blkback_conformance import FrontendLog
from xentools.devices.blkback_grants import DEFAULT_MAX_PERSISTENT_GRANTS, PageSet, SegmentMapper
from xentools.devices.blkback_image import ImageFile
from xentools.devices.blkback_validate import (
    Plan,
    RequestPolicy,
    RequestRejected,
    SlotLayout,
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

__all__ = ["BATCH_MAP_REFS", "IDLE_RECHECK", "POLL_INTERVAL", "DeviceGate", "QueueWorker"]

log = logging.getLogger("xentools.blkback")

POLL_INTERVAL = 0.5  # seconds between ring re-checks without a full barrier
IDLE_RECHECK = 2.0  # seconds between ring re-checks with one
BATCH_MAP_REFS = 1024  # refs in one platform map call for a batch of requests


class DeviceGate:
    """One lock per queue, taken around each request, and a barrier path that takes all."""

    def __init__(self, queues: int) -> None:
        self.locks = [threading.Lock() for _ in range(queues)]
        self._barrier = threading.Lock()

    def acquire_all(self) -> None:
        self._barrier.acquire()  # one barrier at a time: no two threads take locks out of order
        for lock in self.locks:
            lock.acquire()

    def release_all(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self._barrier.release()


class QueueWorker:
    """Serves queue `index` of a connected frontend. Create, then start(); stop() is
    idempotent and releases everything (ring unmapped, port unbound, grants unmapped)."""

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
    ) -> None:
        self.index = index
        self.frontend_id = frontend_id
        self.policy = policy
        self.image = image
        self.gate = gate
        self.lock = gate.locks[index]
        self.report = log_to
        self.on_fatal = on_fatal
        self.layout = SlotLayout(abi)
        self.fatal: str | None = None
        self.served = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._gnttab = platform.open_gnttab()
        self._evtchn = None
        self._ring_pages: MappedPages | None = None
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
        except BaseException:
            self._release()
            raise

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name=f"blkback-queue-{self.index}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and release the ring, port and grants. Waits for the thread."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("queue %d did not stop within %.0f s", self.index, timeout)
                return  # leave its resources alone rather than unmap under a live thread
        self._release()

    def _release(self) -> None:
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
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    # -- the thread ---------------------------------------------------------------------------

    def _thread_main(self) -> None:
        evtchn = self._evtchn
        assert evtchn is not None and self.port is not None
        sel = selectors.DefaultSelector()
        try:
            sel.register(evtchn.fileno(), selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                # Take and unmask every pending event first: a notify that arrives while we
                # work is then delivered again, and the ring is checked once more.
                while (port := evtchn.pending()) is not None:
                    evtchn.unmask(port)
                self._serve_ring()
                if self.fatal is not None:
                    return
                sel.select(self._poll)
        except RingError as err:
            self._fail(err.rule, str(err), violation=True)
        except PlatformError as err:
            self._fail("backend.platform", f"queue {self.index}: {err}", violation=False)
        except Exception as err:  # a bug here must not take the other queues down
            log.exception("queue %d failed", self.index)
            self._fail("backend.internal", f"queue {self.index}: {type(err).__name__}: {err}", violation=False)
        finally:
            sel.close()

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
        ring = self.ring
        get = ring.get_request
        put = ring.put_response
        pack = self.layout.response.pack
        while not self._stop.is_set():
            available = ring.unconsumed_requests()  # RingError on overflow: fatal
            if not available:
                if ring.final_check_for_requests():
                    continue
                return
            slots = [get() for _ in range(available)]  # one private copy each (XSA-155)
            for req_id, rsp_op, status in self._serve_batch(slots):
                put(pack(req_id, rsp_op, status))
            self.served += available
            if ring.push_responses_and_check_notify():
                try:
                    self._evtchn.notify(self.port)  # type: ignore[union-attr]
                except EventChannelError as err:
                    # The frontend closed its end; the owner sees the state change.
                    log.info("queue %d: notify failed: %s", self.index, err)

    # -- one batch ------------------------------------------------------------------------------

    def _serve_batch(self, slots: list[bytes]) -> list[tuple[int, int, int]]:
        """(id, operation to echo, status) for each slot, in order. Every grant mapped for
        the batch is unmapped before this returns, i.e. before any response is published."""
        layout, policy, record = self.layout, self.policy, self.report.record
        plans: list[Plan | None] = []
        answers: list[tuple[int, int, int] | None] = []
        for slot in slots:
            try:
                plan = parse_request(slot, layout, policy)
                if plan.operation == BLKIF_OP_INDIRECT:
                    plan = self._resolve_indirect(plan)
            except RequestRejected as err:
                record(err.rule, str(err))
                _, req_id, rsp_op = layout.header(slot)
                self.report.rejected(rsp_op)
                plans.append(None)
                answers.append((req_id, rsp_op, err.status))
                continue
            plans.append(plan)
            self.report.accepted(slot[0], plan.rsp_operation, len(plan.grefs), plan.nbytes)
            answers.append(None)
        premapped: dict[int, PageSet] = {}
        batch_maps: list[MappedPages] = []
        try:
            if not self.mapper.persistent and len(slots) > 1:
                self._premap(plans, premapped, batch_maps)
            for index, plan in enumerate(plans):
                if plan is not None:
                    answers[index] = (plan.id, plan.rsp_operation, self._run_request(plan, premapped.get(index)))
        finally:
            for mapped in batch_maps:
                self.mapper.unmap(mapped)
        return answers  # type: ignore[return-value]

    def _premap(self, plans: list[Plan | None], premapped: dict[int, PageSet],
                batch_maps: list[MappedPages]) -> None:
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
                            batch_maps.append(mapped)
                            for (index, _), pages in zip(chunk, sets):
                                premapped[index] = pages
                    chunk, count = [], 0
                chunk.append(item)
                count += len(item[1])

    # -- one request --------------------------------------------------------------------------

    def _run_request(self, plan: Plan, pages: PageSet | None) -> int:
        """Status of one valid-looking request, executed under the device gate."""
        barrier = plan.operation == BLKIF_OP_WRITE_BARRIER
        if barrier:
            self.gate.acquire_all()
        else:
            self.lock.acquire()
        try:
            return self._execute(plan, pages)
        except RequestRejected as err:
            self.report.record(err.rule, str(err))
            return err.status
        except OSError as err:
            # The image failed (EIO, ENOSPC): an error for this request, not the frontend's.
            log.error("queue %d: image I/O failed: %s", self.index, err)
            return BLKIF_RSP_ERROR
        finally:
            if barrier:
                self.gate.release_all()
            else:
                self.lock.release()

    def _execute(self, plan: Plan, premapped: PageSet | None) -> int:
        op = plan.operation
        image = self.image
        if op == BLKIF_OP_DISCARD:
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
            pages = premapped
            if pages is None:
                writable = op == BLKIF_OP_READ  # we write into the frontend's pages only for READ
                try:
                    pages = self.mapper.map(plan.grefs, writable)
                except GrantError as err:
                    raise RequestRejected(
                        "segment.gref_unmappable", f"request {plan.id}: {err}"
                    ) from None
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
