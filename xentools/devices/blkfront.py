"""blkfront: a userspace blkif frontend with a block-device API.

Owns: `BlkFront`, one virtual block device seen from the frontend domain: the xenbus
handshake (driven by xentools.core.xenbus.Handshake), the rings and their event channels,
the grant pool (blkfront_pool), request building and batching, response checking
(blkfront_queue), the completion thread, failure and close. Re-exports the public types of
blkfront_types (BlkfrontConfig, BlkFuture, DeviceInfo and the errors).
Must not: know whether the platform is real Xen or the software Xen (it uses only
xentools.platform.interface), or trust anything the backend writes (XSA-376).

API (sectors are units of the disk's sector-size, 512 unless feature-large-sector-size):
    dev = BlkFront.attach(platform, "xvda", config=BlkfrontConfig(...))
    dev.read(sector, nr_sectors) -> bytes        dev.readinto(sector, buf) -> int
    dev.write(sector, data)                      dev.flush()     dev.discard(sector, n)
    fut = dev.submit_read(...) / submit_readinto / submit_write / submit_flush /
          submit_discard (BlkFuture; callbacks run on the completion thread)
    futs = dev.submit_reads([(sector, buf), ...]) / submit_writes([(sector, data), ...])
          (checked first, then one push: at most one notification per queue per batch)
    done = dev.reap(futs, min_done=8, timeout=...)  # reap completions in batches
    io = dev.batch_io(depth=32, request_bytes=4096)  # lanes of persistent grants (blkfront_batch)
    with dev.batch(): ...   # one push (and at most one notification per queue) at the end
    dev.info (DeviceInfo), dev.stats, dev.close()

Batching: requests are written to ring slots as they are submitted and published with one
RING_PUSH_REQUESTS_AND_CHECK_NOTIFY per queue at the end of the submitting call, of a
`batch()` block, or of a completion pass (callbacks that submit more are pushed together);
the backend is notified only when that push crosses its req_event (ring.h). (Publishing
every few requests inside a pass, to overlap with the backend, measured no faster here.)

Buffers: a userspace frontend copies through pages it shares with the backend (XSA-403;
blkfront_pool). Persistent grants: runs of long-lived DmaMaps, the same refs again and
again. Otherwise a grant-DMA DmaMap per request, loaded when refs are free (deferred
otherwise) and unloaded on the response, asking the platform whether the backend still maps
a page before it is reused (XSA-396). Everything stays within `max_grants` (ring pages +
indirect pages + data pages), and with persistent grants the data and indirect pages stay
within `max_persistent_grants` (the backend's persistent-grant cache per ring, 1056 in
Linux blkback: a frontend cycling through more pages makes the backend map and unmap on
every request); a request never needs more than half the pool, and requests that wait for
pages nothing in flight will free fail ("grants.exhausted") instead of hanging.

Failure (Linux 5.16 blkfront after XSA-376/391/396): any response that breaks a rule, a
response that never comes (request_timeout), a grant the backend still maps after its
response, or the backend leaving Connected puts the device in its error state: every request
in flight and every later one fails with DeviceFailed, nothing is returned as success, and
the xenbus state goes to Closing. Pages of requests that were in flight are never reused.
An event with no response behind it is spurious and only counted (XSA-391); a storm of them
is throttled, not fatal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import select
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from xentools.core.blkif import (
    ABIS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_OKAY,
    SEGMENT_SIZE,
    codec_for,
    indirect_pages_for,
)
from xentools.core.errors import FeatureError, GrantDmaError, XenbusError
from xentools.core.features import (
    DiskInfo,
    FrontendPreferences,
    Negotiated,
    QueueRing,
    negotiate,
)
from xentools.core.grant_dma import DmaDirection, DmaFlags, DmaTag, LinearBuffer, LoadStatus
from xentools.core.xenbus import Action, Handshake, Milestone, Step, XenbusState
from xentools.devices.blkfront_pool import PoolGrantAllocator, StagingArea
from xentools.devices.blkfront_queue import BlkfrontQueue, InFlight
from xentools.devices.blkfront_types import (
    BlkFuture,
    BlkfrontConfig,
    BlkfrontError,
    ConnectTimeout,
    DeviceFailed,
    DeviceInfo,
    RequestFailed,
)
from xentools.devices.blkfront_xenbus import (
    BackendStateWatch,
    backend_error,
    feature_error,
    frontend_path_for,
    read_backend_features,
    read_disk_info,
    read_toolstack,
    timeout_error,
    write_ring_info,
    write_state,
)
from xentools.platform.interface import PAGE_SIZE, PlatformError, Platform, XenstoreError

__all__ = [
    "BlkFront",
    "BlkFuture",
    "BlkfrontConfig",
    "BlkfrontError",
    "ConnectTimeout",
    "DeviceFailed",
    "DeviceInfo",
    "RequestFailed",
    "frontend_path_for",
]

_NOMINAL_STRIDE_PAGES = 1 << 13  # nominal address space per request slot (> 4096 + 8 pages)
_DEADLINE_CHECK = 0.25  # seconds between scans for requests past their deadline
_POLL_MS = 250
_POLL_MS_NO_BARRIER = 10  # without a full barrier the ring is re-checked this often
_STORM_STREAK = 64  # spurious events in a row before unmasking is delayed (XSA-391)
_STORM_DELAY = 0.002
_MAX_EXTENT_PAGES = 1024  # pages per share() call (platforms bound one call)
# The largest disk, in bytes, a backend may announce: every byte needs a signed 64-bit file
# offset (Linux's MAX_LFS_FILESIZE); 2^64 - 1 sectors is a backend's lie, not a disk.
MAX_DISK_BYTES = (1 << 63) - 1


class _Op:
    """One user-level operation: one future, one or more blkif requests (chunks)."""

    __slots__ = ("future", "remaining", "dest", "result", "error", "kind", "src", "whole")

    def __init__(self, future: BlkFuture, kind: int, remaining: int) -> None:
        self.future = future
        self.kind = kind
        self.remaining = remaining
        self.dest: memoryview | None = None  # where read data goes (None: build bytes)
        self.src: memoryview | None = None  # write data
        self.result: Any = None
        self.error: BaseException | None = None
        self.whole = False  # a read without a destination split into chunks


class BlkFront:
    """A blkif frontend for the device whose frontend directory is `frontend_path`.

    Create and connect with `attach()` (or the constructor then `connect()`); use it as a
    context manager to close it. Thread-safe: one lock guards the rings and the pool.
    """

    def __init__(self, platform: Platform, frontend_path: str, config: BlkfrontConfig | None = None) -> None:
        self.platform = platform
        self.frontend_path = frontend_path
        self.config = config if config is not None else BlkfrontConfig()
        self._lock = threading.RLock()
        self._tls = threading.local()
        self._status = "new"  # new, connecting, connected, failed, closed
        self._failure: tuple[str, str] | None = None
        self._xs = None
        self._gntshr = None
        self._evtchn = None
        self._watch: BackendStateWatch | None = None
        self._hs: Handshake | None = None
        self._rings_granted = False
        self._backend_path = ""
        self._backend_id = 0
        self._virtual_device = 0
        self._handle = 0
        self._queues: list[BlkfrontQueue] = []
        self._by_port: dict[int, BlkfrontQueue] = {}
        self._neg0: Negotiated | None = None
        self._neg: Negotiated | None = None
        self._disk: DiskInfo | None = None
        self._allocator: PoolGrantAllocator | None = None
        self._staging: StagingArea | None = None
        self._tag: DmaTag | None = None
        self._persistent = False
        self._pool_pages = 0
        self._segs = BLKIF_MAX_SEGMENTS_PER_REQUEST
        self._indirect = False
        self._ss = 512
        self._spp = 8
        self._flush_op: int | None = None
        self._discard = False
        self._discard_secure = False
        self._rr = 0
        self._thread: threading.Thread | None = None
        self._thread_ident: int | None = None
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._storm = 0
        self._next_deadline_check = 0.0
        self._request_timeout = self.config.request_timeout
        self.info: DeviceInfo | None = None
        self.close_report: dict[str, Any] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "requests", "direct_requests", "indirect_requests", "responses", "notifications",
                "events", "spurious_events", "backlogged", "deferred_loads", "errors",
                "callback_errors", "max_in_flight",
            ),
            0,
        )

    # ------------------------------------------------------------------------------------
    # Attaching and the handshake
    # ------------------------------------------------------------------------------------

    @classmethod
    def attach(
        cls,
        platform: Platform,
        vbd: str | int = "xvda",
        *,
        config: BlkfrontConfig | None = None,
        domid: int | None = None,
    ) -> BlkFront:
        """Connect to the device `vbd` (name, number or frontend path) of domain `domid`
        (default: the platform's). Raises BlkfrontError (ConnectTimeout, FeatureError
        wrapped with the key) and leaves nothing behind on failure."""
        path = frontend_path_for(platform.domid if domid is None else domid, vbd)
        dev = cls(platform, path, config)
        try:
            dev.connect()
        except BaseException:
            dev.close()
            raise
        return dev

    def connect(self) -> None:
        """Run the handshake until Connected (blkif.h "STATE DIAGRAMS"), then start I/O."""
        if self._status != "new":
            raise BlkfrontError("device.state", f"connect() on a device that is {self._status}")
        self._status = "connecting"
        cfg = self.config
        self._xs = xs = self.platform.open_xenstore(timeout=cfg.connect_timeout)
        try:
            tool = read_toolstack(xs, self.frontend_path)
        except FeatureError as err:
            raise feature_error(err, f"frontend directory {self.frontend_path}") from None
        self._backend_path = tool.backend
        self._backend_id = tool.backend_id
        self._virtual_device = tool.virtual_device
        # blkif_vdev_t is u16; Linux puts the device number there, truncated.
        self._handle = tool.virtual_device & 0xFFFF
        self._hs = Handshake("frontend")
        write_state(xs, self.frontend_path, XenbusState.Initialising)
        self._watch = watch = BackendStateWatch(xs, self._backend_path, f"blkfront:{self.frontend_path}")
        deadline = time.monotonic() + cfg.connect_timeout
        while True:
            try:
                state = watch.read()
            except FeatureError as err:
                raise feature_error(err, f"backend {self._backend_path}") from None
            self._feed(self._hs_step(lambda: self._hs.peer_changed(state)))
            if self._hs.state == XenbusState.Connected:
                break
            if self._hs.state in (XenbusState.Closing, XenbusState.Closed):
                raise BlkfrontError(
                    "connect.backend_closed",
                    f"backend {self._backend_path} went to {state.name} during the handshake"
                    + backend_error(xs, self._backend_path),
                )
            if not watch.wait_event(deadline):
                what = "Connected" if self._rings_granted else "InitWait"
                raise timeout_error(what, watch, cfg.connect_timeout)
        self._start_io()

    def _hs_step(self, fn) -> Step:
        try:
            return fn()
        except XenbusError as err:
            raise BlkfrontError(err.rule, err.detail) from None

    def _feed(self, step: Step) -> None:
        """Carry out one Step: actions in order, then the state write; milestones the actions
        reached are fed afterwards, one at a time (xenbus.py's rule)."""
        milestones: list[Milestone] = []
        for action in step.actions:
            milestone = self._do(action)
            if milestone is not None:
                milestones.append(milestone)
        if step.new_state is not None:
            write_state(self._xs, self.frontend_path, step.new_state)
        for milestone in milestones:
            self._feed(self._hs_step(lambda m=milestone: self._hs.milestone(m)))

    def _do(self, action: Action) -> Milestone | None:
        if action is Action.read_backend_features_and_connect:
            self._grant_rings()
            return Milestone.rings_granted
        if action is Action.read_disk_info:
            self._read_disk()
            return Milestone.disk_info_read
        if action in (Action.disconnect, Action.teardown):
            if self._status == "connected":
                self._fail("backend.closed", f"backend {self._backend_path} left Connected")
            return None
        raise BlkfrontError("xenbus.action", f"no frontend action {action}")  # pragma: no cover

    def _preferences(self) -> FrontendPreferences:
        cfg = self.config
        return FrontendPreferences(
            ring_page_order=cfg.ring_page_order,
            num_queues=cfg.num_queues,
            max_indirect_segments=cfg.max_indirect_segments,
            feature_persistent=cfg.persistent,
            feature_large_sector_size=cfg.large_sector_size,
        )

    def _grant_rings(self) -> None:
        """read_backend_features_and_connect: negotiate the transport, grant the rings, bind
        the event channels and write FrontendRingInfo in one transaction."""
        if self._queues:
            raise BlkfrontError("connect.rings", "the backend asked for rings twice")
        try:
            features = read_backend_features(self._xs, self._backend_path)
        except FeatureError as err:
            raise feature_error(err, f"backend {self._backend_path}") from None
        neg = negotiate(features, self._preferences())
        ring_grants = neg.num_queues * neg.ring_pages
        if self.config.max_grants - ring_grants < 4 * BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BlkfrontError(
                "grants.budget",
                f"{neg.num_queues} rings of {neg.ring_pages} pages leave too few of the "
                f"{self.config.max_grants} grants for data",
            )
        codec = codec_for(ABIS[self.config.protocol])
        self._gntshr = self.platform.open_gntshr()
        self._evtchn = self.platform.open_evtchn()
        for index in range(neg.num_queues):
            pages = self._gntshr.share(self._backend_id, neg.ring_pages, writable=True)
            try:
                port = self._evtchn.bind_unbound(self._backend_id)
            except BaseException:
                self._gntshr.unshare(pages)
                raise
            queue = BlkfrontQueue(index, codec, pages, neg.ring_page_order, self.platform.full_barrier, port)
            self._queues.append(queue)
            self._by_port[port] = queue
        info = neg.ring_info([QueueRing(q.pages.refs, q.port) for q in self._queues], self.config.protocol)
        # feature-persistent is the frontend's own wish (blkif.h), written whatever the
        # backend showed so far: Linux blkback advertises it only when it connects, and
        # uses persistent grants only if the frontend's key said so before. Whether we
        # reuse grants is decided at Connected (both sides said 1: _read_disk's negotiate).
        info = dataclasses.replace(info, feature_persistent=self.config.persistent)
        write_ring_info(self._xs, self.frontend_path, info)
        self._rings_granted = True
        self._neg0 = neg

    def _read_disk(self) -> None:
        """read_disk_info: the disk (and, as Linux blkback publishes them only now, the I/O
        features). Again while connected: the backend announces a resize."""
        try:
            disk = read_disk_info(self._xs, self._backend_path)
            disk.validate(feature_large_sector_size=self.config.large_sector_size)
            features = read_backend_features(self._xs, self._backend_path)
        except FeatureError as err:
            raise feature_error(err, f"backend {self._backend_path}") from None
        if disk.sector_size > PAGE_SIZE:
            raise BlkfrontError(
                "backend.sector-size.unsupported",
                f"sector-size {disk.sector_size} is larger than a page; segments cannot hold a sector",
            )
        if disk.sectors * disk.sector_size > MAX_DISK_BYTES:
            raise BlkfrontError(
                "backend.sectors.range",
                f"sectors {disk.sectors} of {disk.sector_size} bytes is more than a disk can hold (its last byte "
                f"must have a file offset, at most 2^63 - 1): the backend published an absurd size",
            )
        if self._disk is not None:
            if disk.sector_size != self._disk.sector_size:
                raise BlkfrontError("backend.sector-size.changed", "the sector size changed under a live device")
            self._disk = disk
            if self.info is not None:
                self.info = self._describe()
            return
        self._disk = disk
        self._neg = negotiate(features, self._preferences())

    # ------------------------------------------------------------------------------------
    # I/O setup
    # ------------------------------------------------------------------------------------

    def _start_io(self) -> None:
        neg0, neg, disk = self._neg0, self._neg, self._disk
        assert neg0 is not None and neg is not None and disk is not None
        self._ss = disk.sector_size
        self._spp = PAGE_SIZE // self._ss
        pool_pages = self.config.max_grants - neg0.num_queues * neg0.ring_pages
        self._persistent = neg.persistent
        if self._persistent:
            # Never more pages than the backend's persistent-grant cache holds (per ring; the
            # pool is shared by the rings, so no ring sees more): beyond it, the backend
            # would map and unmap for every request.
            pool_pages = min(pool_pages, self.config.max_persistent_grants)
        self._pool_pages = pool_pages
        # Requests never need more than half the pool, so two always fit (and a deferred
        # load can always complete once others finish).
        cap = pool_pages // 2
        self._indirect = False
        self._segs = BLKIF_MAX_SEGMENTS_PER_REQUEST
        if neg0.max_indirect_segments:
            segs = min(neg0.max_indirect_segments, cap - indirect_pages_for(cap))
            if segs > BLKIF_MAX_SEGMENTS_PER_REQUEST:
                self._indirect = True
                self._segs = segs
        max_pages = self._segs + (indirect_pages_for(self._segs) if self._indirect else 0)
        if self._persistent:
            buffer_pages = min(pool_pages, max(max_pages, 64))
            # One share() per extent; a buffer larger than an extent spans several (and is
            # then copied page by page). 1 MiB requests stay in one contiguous extent.
            self._allocator = PoolGrantAllocator(
                self._gntshr, self._backend_id, max_pages=pool_pages,
                extent_pages=min(buffer_pages, _MAX_EXTENT_PAGES), check_mapped=False,
            )
            self._staging = StagingArea(
                self._allocator, self._backend_id, buffer_pages=buffer_pages, sectors_per_page=self._spp
            )
        else:
            # One page per share() so that is_mapped() answers for exactly one page.
            self._allocator = PoolGrantAllocator(
                self._gntshr, self._backend_id, max_pages=pool_pages, extent_pages=1, check_mapped=True
            )
            self._tag = DmaTag(self._allocator, domid=self._backend_id, max_segments=max_pages, alignment=512)
        if neg.flush_cache:
            self._flush_op = BLKIF_OP_FLUSH_DISKCACHE
        elif neg.barrier:
            self._flush_op = BLKIF_OP_WRITE_BARRIER
        self._discard = neg.discard
        self._discard_secure = neg.discard_secure
        self.info = self._describe()
        self._status = "connected"
        self._thread = threading.Thread(target=self._run, name=f"blkfront {self.frontend_path}", daemon=True)
        self._thread.start()

    def _describe(self) -> DeviceInfo:
        neg0, neg, disk = self._neg0, self._neg, self._disk
        assert neg0 is not None and neg is not None and disk is not None
        return DeviceInfo(
            frontend_path=self.frontend_path,
            backend_path=self._backend_path,
            backend_id=self._backend_id,
            virtual_device=self._virtual_device,
            protocol=self.config.protocol,
            sectors=disk.sectors,
            sector_size=disk.sector_size,
            physical_sector_size=disk.physical_sector_size or disk.sector_size,
            readonly=disk.readonly,
            cdrom=disk.cdrom,
            removable=disk.removable,
            ring_page_order=neg0.ring_page_order,
            ring_entries=self._queues[0].size,
            num_queues=neg0.num_queues,
            max_indirect_segments=neg0.max_indirect_segments,
            segments_per_request=self._segs,
            persistent=self._persistent,
            large_sector_size=neg.large_sector_size,
            flush_cache=self._flush_op == BLKIF_OP_FLUSH_DISKCACHE,
            barrier=self._flush_op == BLKIF_OP_WRITE_BARRIER,
            discard=self._discard,
            discard_secure=self._discard_secure,
            max_grants=self.config.max_grants,
            data_pages=self._pool_pages,
        )

    # ------------------------------------------------------------------------------------
    # Public I/O API
    # ------------------------------------------------------------------------------------

    @property
    def sectors(self) -> int:
        self._require_info()
        assert self._disk is not None
        return self._disk.sectors

    @property
    def sector_size(self) -> int:
        self._require_info()
        return self._ss

    @property
    def failed(self) -> tuple[str, str] | None:
        """(rule, detail) of the failure that put the device in its error state, or None."""
        return self._failure

    def _require_info(self) -> None:
        if self.info is None:
            raise BlkfrontError("device.not_connected", "the device is not connected")

    def read(self, sector: int, nr_sectors: int) -> bytes:
        return self.submit_read(sector, nr_sectors).result()

    def readinto(self, sector: int, buf: Any) -> int:
        return self.submit_readinto(sector, buf).result()

    def write(self, sector: int, data: Any) -> None:
        self.submit_write(sector, data).result()

    def flush(self) -> None:
        """Flush the backend's cache. Waits for every request in flight first, so the flush
        covers every write submitted before it."""
        self.drain()
        self.submit_flush().result()

    def discard(self, sector: int, nr_sectors: int, *, secure: bool = False) -> None:
        self.submit_discard(sector, nr_sectors, secure=secure).result()

    def submit_read(self, sector: int, nr_sectors: int, *, callback=None) -> BlkFuture:
        """Read; the future's result is the data (bytes)."""
        return self._submit_rw(BLKIF_OP_READ, sector, nr_sectors, None, callback)

    def submit_readinto(self, sector: int, buf: Any, *, callback=None) -> BlkFuture:
        """Read len(buf) bytes (whole sectors) into the writable buffer `buf`, copied straight
        from the granted pages; the future's result is the byte count. Do not touch `buf`
        until the future is done."""
        view = _byte_view(buf, writable=True)
        nr = self._whole_sectors(view.nbytes)
        return self._submit_rw(BLKIF_OP_READ, sector, nr, view, callback)

    def submit_write(self, sector: int, data: Any, *, callback=None) -> BlkFuture:
        """Write `data` (whole sectors). `data` is copied into granted pages when its request
        is built, which may be later if the ring or pool is full: keep it unchanged until the
        future is done."""
        view = _byte_view(data, writable=False)
        nr = self._whole_sectors(view.nbytes)
        return self._submit_rw(BLKIF_OP_WRITE, sector, nr, view, callback)

    def submit_flush(self, *, callback=None) -> BlkFuture:
        """BLKIF_OP_FLUSH_DISKCACHE (or WRITE_BARRIER if that is all the backend offers). A
        backend advertising neither has no cache to flush: the future completes at once."""
        with self._lock:
            self._check_usable()
            fut = BlkFuture(self._lock, self)
            if callback is not None:
                fut.add_done_callback(callback)
            if self._flush_op is None:
                fut._finish(None, None)
                return fut
            op = _Op(fut, self._flush_op, 1)
            entry = InFlight()
            entry.op = entry.rsp_op = self._flush_op
            entry.parent = op
            self._dispatch(self._next_queue(), entry)
            self._maybe_push()
            return fut

    def submit_discard(self, sector: int, nr_sectors: int, *, secure: bool = False, callback=None) -> BlkFuture:
        """BLKIF_OP_DISCARD of nr_sectors from sector (needs feature-discard; secure needs
        discard-secure). Raises BlkfrontError "discard.unsupported" otherwise."""
        with self._lock:
            self._check_usable()
            self._check_range(sector, nr_sectors)
            if not self._discard:
                raise BlkfrontError("discard.unsupported", "the backend does not offer feature-discard")
            if secure and not self._discard_secure:
                raise BlkfrontError("discard.unsupported", "the backend does not offer discard-secure")
            if self.info is not None and self.info.readonly:
                raise BlkfrontError("request.readonly", "the disk is read-only")
            fut = BlkFuture(self._lock, self)
            if callback is not None:
                fut.add_done_callback(callback)
            op = _Op(fut, BLKIF_OP_DISCARD, 1)
            entry = InFlight()
            entry.op = entry.rsp_op = BLKIF_OP_DISCARD
            entry.parent = op
            entry.sector = sector
            entry.nr_sectors = nr_sectors
            entry.secure = secure
            self._dispatch(self._next_queue(), entry)
            self._maybe_push()
            return fut

    def submit_reads(self, requests: Iterable[tuple[int, Any]]) -> list[BlkFuture]:
        """Read many: for each (sector, buffer), len(buffer) bytes (whole sectors) from
        `sector` into the writable `buffer`, copied once, straight from the granted pages.
        Every request is checked before any is submitted (a bad one raises BlkfrontError
        and nothing is sent); they are then put on the rings under one lock and published
        with one push per queue: at most one notification per queue for the whole batch.
        Each future's result is its byte count; collect them with reap()."""
        views = [(sector, _byte_view(buf, writable=True)) for sector, buf in requests]
        return self._submit_many(BLKIF_OP_READ, views)

    def submit_writes(self, requests: Iterable[tuple[int, Any]]) -> list[BlkFuture]:
        """Write many: each (sector, data) as submit_write, checked first, published with
        one push per queue (see submit_reads)."""
        views = [(sector, _byte_view(data, writable=False)) for sector, data in requests]
        return self._submit_many(BLKIF_OP_WRITE, views)

    def _submit_many(self, kind: int, views: list[tuple[int, memoryview]]) -> list[BlkFuture]:
        with self._lock:
            self._check_usable()
            if kind == BLKIF_OP_WRITE and self.info is not None and self.info.readonly:
                raise BlkfrontError("request.readonly", "the disk is read-only")
            for sector, view in views:
                self._check_range(sector, self._whole_sectors(view.nbytes))
            depth = getattr(self._tls, "depth", 0)
            self._tls.depth = depth + 1
            try:
                return [
                    self._submit_rw(kind, sector, view.nbytes // self._ss, view, None)
                    for sector, view in views
                ]
            finally:
                self._tls.depth = depth
                if depth == 0:
                    self._push_all()

    def reap(self, futures: Iterable[BlkFuture], min_done: int = 1, timeout: float | None = None) -> list[BlkFuture]:
        """Wait until at least `min_done` of `futures` are done (all of them, if fewer) and
        return those that are done, in the order given: reap completions in batches
        instead of waiting for each. Raises BlkfrontError "future.timeout" after `timeout`
        seconds, "future.wait_in_callback" on the completion thread."""
        futs = list(futures)
        want = min(min_done, len(futs))
        with self._lock:
            done = sum(1 for fut in futs if fut.done())
            if done >= want:
                return [fut for fut in futs if fut.done()]
            if self._on_completion_thread():
                raise BlkfrontError("future.wait_in_callback", "a completion callback cannot wait for a future")
            event = threading.Event()
            count = [done]

            def tick(_: BlkFuture) -> None:
                count[0] += 1
                if count[0] >= want:
                    event.set()

            for fut in futs:
                if not fut.done():
                    fut.add_done_callback(tick)
        if not event.wait(timeout):
            raise BlkfrontError("future.timeout", f"fewer than {want} operations complete after {timeout} s")
        with self._lock:
            return [fut for fut in futs if fut.done()]

    def batch_io(self, depth: int = 32, request_bytes: int = PAGE_SIZE, queue: int = 0):  # type: ignore[no-untyped-def]
        """Batch I/O with lanes of persistent grants (blkfront_batch.BatchIO)."""
        from xentools.devices.blkfront_batch import BatchIO

        return BatchIO(self, depth, request_bytes, queue)

    @contextlib.contextmanager
    def batch(self) -> Iterator[BlkFront]:
        """Submit many requests, publish them once: `with dev.batch(): dev.submit_read(...)`."""
        depth = getattr(self._tls, "depth", 0)
        self._tls.depth = depth + 1
        try:
            yield self
        finally:
            self._tls.depth = depth
            if depth == 0:
                with self._lock:
                    self._push_all()

    def drain(self, timeout: float | None = None) -> None:
        """Wait until no request is in flight or waiting (or the device failed)."""
        limit = timeout if timeout is not None else self.config.request_timeout + 5.0
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                if self._status != "connected" or not self._busy():
                    return
                if self._on_completion_thread():
                    raise BlkfrontError("future.wait_in_callback", "a completion callback cannot drain")
            if time.monotonic() > deadline:
                raise BlkfrontError("drain.timeout", f"requests still in flight after {limit:g} s")
            time.sleep(0.001)

    def _busy(self) -> bool:
        return any(q.in_flight or q.backlog for q in self._queues)

    # ------------------------------------------------------------------------------------
    # Building requests
    # ------------------------------------------------------------------------------------

    def _whole_sectors(self, nbytes: int) -> int:
        self._require_info()
        if nbytes == 0 or nbytes % self._ss:
            raise BlkfrontError("request.length", f"{nbytes} bytes is not a whole number of {self._ss}-byte sectors")
        return nbytes // self._ss

    def _check_usable(self) -> None:
        if self._status == "failed":
            assert self._failure is not None
            raise DeviceFailed(*self._failure)
        if self._status != "connected":
            raise BlkfrontError("device.not_connected", f"the device is {self._status}")

    def _check_range(self, sector: int, nr_sectors: int) -> None:
        for name, value in (("sector", sector), ("nr_sectors", nr_sectors)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise BlkfrontError("request.range", f"{name} {value!r} is not an integer")
        assert self._disk is not None
        if sector < 0 or nr_sectors < 1 or sector + nr_sectors > self._disk.sectors:
            raise BlkfrontError(
                "request.range",
                f"sectors {sector}..{sector + nr_sectors - 1} are outside the disk (0..{self._disk.sectors - 1})",
            )

    def _next_queue(self) -> BlkfrontQueue:
        queue = self._queues[self._rr]
        self._rr = (self._rr + 1) % len(self._queues)
        return queue

    def _submit_rw(self, kind: int, sector: int, nr_sectors: int, view: memoryview | None, callback) -> BlkFuture:
        with self._lock:
            if self._status != "connected":
                self._check_usable()
            disk_sectors = self._disk.sectors
            if (
                type(sector) is not int or type(nr_sectors) is not int
                or sector < 0 or nr_sectors < 1 or sector + nr_sectors > disk_sectors
            ):
                self._check_range(sector, nr_sectors)
            if kind == BLKIF_OP_WRITE and self.info.readonly:
                raise BlkfrontError("request.readonly", "the disk is read-only")
            nbytes = nr_sectors * self._ss
            chunk = self._segs * PAGE_SIZE
            fut = BlkFuture(self._lock, self)
            if callback is not None:
                fut._callbacks = [callback]  # not done yet, and we hold the lock
            if nbytes <= chunk:
                # One blkif request: the common case, kept short.
                op = _Op(fut, kind, 1)
                if kind == BLKIF_OP_WRITE:
                    op.src = view
                elif view is not None:
                    op.dest = view
                    op.result = nbytes
                entry = InFlight()
                entry.op = entry.rsp_op = kind
                entry.parent = op
                entry.sector = sector
                entry.nbytes = nbytes
                pages = -(-nbytes // PAGE_SIZE)
                if pages > BLKIF_MAX_SEGMENTS_PER_REQUEST:
                    pages += indirect_pages_for(pages)
                entry.npages = pages
                self._dispatch(self._next_queue(), entry)
                if getattr(self._tls, "depth", 0) == 0:
                    self._push_all()
                return fut
            nchunks = -(-nbytes // chunk)
            op = _Op(fut, kind, nchunks)
            if kind == BLKIF_OP_WRITE:
                op.src = view
            elif view is not None:
                op.dest = view
                op.result = nbytes
            else:
                buf = bytearray(nbytes)
                op.dest = memoryview(buf)
                op.result = buf
                op.whole = True
            chunk_sectors = chunk // self._ss
            offset = 0
            for index in range(nchunks):
                entry = InFlight()
                entry.op = entry.rsp_op = kind
                entry.parent = op
                entry.offset = offset
                entry.sector = sector + index * chunk_sectors
                size = min(chunk, nbytes - offset)
                entry.nbytes = size
                pages = -(-size // PAGE_SIZE)
                if pages > BLKIF_MAX_SEGMENTS_PER_REQUEST:
                    pages += indirect_pages_for(pages)
                entry.npages = pages
                offset += size
                self._dispatch(self._next_queue(), entry)
            self._maybe_push()
            return fut

    def _dispatch(self, queue: BlkfrontQueue, entry: InFlight) -> None:
        if queue.backlog or not self._start(queue, entry):
            queue.backlog.append(entry)
            self.stats["backlogged"] += 1
            if not self._on_completion_thread():
                # (A completion pass checks once it has restarted its backlogs: responses it
                # took have freed pages the backlog has not been offered yet.)
                self._check_stalled()

    def _check_stalled(self) -> None:
        """Requests wait for slots or pages that only a response can free: if nothing is on
        any ring, no response will come, and waiting would be forever (the platform refused
        to share more pages). Fail instead of hanging."""
        waiting = False
        for queue in self._queues:
            if queue.backlog:
                waiting = True
            for entry in queue.shadow:
                if entry is not None:
                    if entry.deadline:
                        return  # a response will come (or its timeout will fire)
                    waiting = True
        if waiting:
            self._fail("grants.exhausted", "requests wait for grant pages that nothing in flight will free")

    def _start(self, queue: BlkfrontQueue, entry: InFlight) -> bool:
        """Give `entry` a slot and pages and put it on the ring (or, without persistent
        grants, on the grant-DMA layer's wait list). False: wait in the backlog."""
        if not queue.claim_slot(entry):
            return False
        if queue.in_flight > self.stats["max_in_flight"]:
            self.stats["max_in_flight"] = queue.in_flight
        if entry.npages == 0:
            self._issue_bare(queue, entry)
            return True
        if self._persistent:
            assert self._staging is not None
            got = self._staging.take(entry.npages)
            if got is None:
                queue.release_slot(entry)
                return False
            entry.staging, entry.start = got
            self._issue_persistent(queue, entry)
            return True
        assert self._tag is not None
        dma_map = self._tag.create_map()
        entry.dma_map = dma_map
        direction = DmaDirection.DEVICE_WRITES if entry.op == BLKIF_OP_READ else DmaDirection.DEVICE_READS
        base = ((queue.index << 9) | entry.slot) * _NOMINAL_STRIDE_PAGES * PAGE_SIZE
        status = dma_map.load(
            LinearBuffer(base, entry.npages * PAGE_SIZE),
            direction,
            functools.partial(self._loaded, queue, entry),
            DmaFlags.WAITOK,
        )
        if status is LoadStatus.EINPROGRESS:
            # Holds its slot; the grant-DMA layer calls back when refs are freed.
            self.stats["deferred_loads"] += 1
        return True

    def _put(self, queue: BlkfrontQueue, entry: InFlight, request: bytes | bytearray) -> None:
        entry.deadline = time.monotonic() + self._request_timeout
        queue.put(request)
        self.stats["requests"] += 1

    def _issue_bare(self, queue: BlkfrontQueue, entry: InFlight) -> None:
        codec = queue.codec
        if entry.op == BLKIF_OP_DISCARD:
            request = codec.discard_request(self._handle, entry.id, entry.sector, entry.nr_sectors, entry.secure)
        else:  # flush or barrier without data (blkif.h allows 0 segments for both)
            request = codec.rw_request(entry.op, self._handle, entry.id, 0, b"", 0)
        self._put(queue, entry, request)

    def _segments_request(self, queue: BlkfrontQueue, entry: InFlight, segs: bytes | bytearray, ndata: int, indirect_pages) -> bytes | bytearray:
        """The request for `ndata` data segments (packed in `segs`): direct when they fit,
        else INDIRECT with the segments copied into `indirect_pages` [(ref, page view)]."""
        codec = queue.codec
        if ndata <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            self.stats["direct_requests"] += 1
            return codec.rw_request(entry.op, self._handle, entry.id, entry.sector, segs, ndata)
        self.stats["indirect_requests"] += 1
        refs = []
        for index, (ref, page) in enumerate(indirect_pages):
            part = segs[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
            page[: len(part)] = part
            refs.append(ref)
        entry.op = BLKIF_OP_INDIRECT
        return codec.indirect_request(entry.rsp_op, self._handle, entry.id, entry.sector, ndata, refs)

    def _last_sect(self, entry: InFlight, ndata: int) -> int:
        tail = entry.nbytes - (ndata - 1) * PAGE_SIZE
        return tail // self._ss - 1

    def _issue_persistent(self, queue: BlkfrontQueue, entry: InFlight) -> None:
        buf = entry.staging
        start = entry.start
        nbytes = entry.nbytes
        ndata = -(-nbytes // PAGE_SIZE)
        if entry.op == BLKIF_OP_WRITE:
            src = entry.parent.src
            self._copy_in(buf, start, src[entry.offset : entry.offset + nbytes])
        segs = buf.segments[SEGMENT_SIZE * start : SEGMENT_SIZE * (start + ndata)]
        last = (nbytes - (ndata - 1) * PAGE_SIZE) // self._ss - 1
        if last != self._spp - 1:
            codec = queue.codec
            segs = bytearray(segs)
            segs[codec.segment_size * (ndata - 1) + codec.last_sect_at] = last
        entry.deadline = time.monotonic() + self._request_timeout
        if ndata <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            self.stats["direct_requests"] += 1
            request = queue.codec.rw_request(entry.op, self._handle, entry.id, entry.sector, segs, ndata)
        else:
            first_ind = start + ndata
            indirect = [(buf.refs[i], buf.pages[i]) for i in range(first_ind, start + entry.npages)]
            request = self._segments_request(queue, entry, segs, ndata, indirect)
        queue.put(request)
        self.stats["requests"] += 1

    @staticmethod
    def _copy_in(buf, start: int, data: memoryview) -> None:
        if buf.view is not None:
            base = start * PAGE_SIZE
            buf.view[base : base + data.nbytes] = data
            return
        for index in range(0, data.nbytes, PAGE_SIZE):
            part = data[index : index + PAGE_SIZE]
            buf.pages[start + index // PAGE_SIZE][: part.nbytes] = part

    def _loaded(self, queue: BlkfrontQueue, entry: InFlight, segments) -> None:
        """Grant-DMA load callback (per-request grants): the refs are bound; build and put
        the request. May run later, from a free() during a completion pass."""
        if self._status != "connected" or queue.shadow[entry.slot] is not entry:
            return  # the device failed meanwhile; the map is dealt with at close
        allocator = self._allocator
        assert allocator is not None
        nbytes = entry.nbytes
        ndata = -(-nbytes // PAGE_SIZE)
        if entry.op == BLKIF_OP_WRITE:
            src = entry.parent.src
            for index in range(ndata):
                part = src[entry.offset + index * PAGE_SIZE : entry.offset + min(nbytes, (index + 1) * PAGE_SIZE)]
                allocator.page(segments[index].gref)[: part.nbytes] = part
        last = self._last_sect(entry, ndata)
        full = self._spp - 1
        segs = queue.codec.pack_segments(
            [(seg.gref, 0, full if index < ndata - 1 else last) for index, seg in enumerate(segments[:ndata])]
        )
        indirect = [(seg.gref, allocator.page(seg.gref)) for seg in segments[ndata:]]
        self._put(queue, entry, self._segments_request(queue, entry, segs, ndata, indirect))
        queue.unpushed = True

    def _maybe_push(self) -> None:
        if getattr(self._tls, "depth", 0) == 0:
            self._push_all()

    def _push_all(self) -> None:
        for queue in self._queues:
            if queue.unpushed:
                if queue.push():
                    try:
                        self._evtchn.notify(queue.port)
                    except PlatformError as err:
                        self._fail("evtchn.notify", f"queue {queue.index}: {err}")
                        return
                    self.stats["notifications"] += 1

    # ------------------------------------------------------------------------------------
    # Completions
    # ------------------------------------------------------------------------------------

    def _callback_failed(self) -> None:
        self.stats["callback_errors"] += 1

    def _on_completion_thread(self) -> bool:
        return self._thread_ident is not None and threading.get_ident() == self._thread_ident

    def _run(self) -> None:
        self._thread_ident = threading.get_ident()
        poller = select.poll()
        evtchn_fd = self._evtchn.fileno()
        xs_fd = self._xs.fileno()
        for fd in (evtchn_fd, xs_fd, self._wake_r):
            poller.register(fd, select.POLLIN)
        interval = _POLL_MS if self.platform.full_barrier is not None else _POLL_MS_NO_BARRIER
        try:
            while not self._stopping:
                ready = {fd for fd, _ in poller.poll(interval)}
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                # A quiet interval re-checks every ring: a notification lost on the way (or
                # never sent by a backend that read a stale rsp_event) costs one interval.
                ports = self._pass(xs_fd in ready, recheck=not ready or self._wake_r in ready)
                if ports is None:
                    continue
                if self._storm > _STORM_STREAK:
                    time.sleep(_STORM_DELAY)  # XSA-391: throttle an event storm
                for port in ports:
                    try:
                        self._evtchn.unmask(port)
                    except PlatformError:
                        pass  # the port went away; the next pass notices the failure
        except BaseException as err:  # never leave futures waiting on a dead thread
            with self._lock:
                self._fail("frontend.internal", f"completion thread stopped: {err!r}")

    def _pass(self, xs_ready: bool, recheck: bool = False) -> list[int] | None:
        """One completion pass under the lock: events, responses, backlog, watch, deadlines.
        Returns the ports to unmask (None when stopping)."""
        with self._lock:
            if self._stopping:
                return None
            self._tls.depth = getattr(self._tls, "depth", 0) + 1
            ports: list[int] = []
            try:
                while True:
                    port = self._evtchn.pending()
                    if port is None:
                        break
                    ports.append(port)
                self.stats["events"] += len(ports)
                work = 0
                if self._status == "connected":
                    polled = self._queues if recheck or self.platform.full_barrier is None else (
                        self._by_port[p] for p in ports if p in self._by_port
                    )
                    for queue in polled:
                        work += self._process(queue)
                        if self._status != "connected":
                            break
                if ports and not work:
                    self.stats["spurious_events"] += len(ports)
                    self._storm += len(ports)
                elif work:
                    self._storm = 0
                if self._status == "connected":
                    self._run_backlogs()
                    if any(q.backlog for q in self._queues):
                        self._check_stalled()
                if xs_ready:
                    self._watch_event()
                now = time.monotonic()
                if now >= self._next_deadline_check:
                    self._next_deadline_check = now + _DEADLINE_CHECK
                    self._check_deadlines(now)
            except PlatformError as err:
                self._fail("platform", str(err))
            finally:
                self._tls.depth -= 1
                if self._status == "connected":
                    self._push_all()
            return ports

    def _process(self, queue: BlkfrontQueue) -> int:
        done, violation = queue.take_responses()
        settled, queue.settled = queue.settled, 0  # a batch's requests (blkfront_batch)
        self.stats["responses"] += len(done) + settled
        for entry, status in done:
            self._complete(entry, status)
        if violation is not None:
            self._fail(violation.rule, violation.detail)
        return len(done) + settled + (violation is not None)

    def _complete(self, entry: InFlight, status: int) -> None:
        op: _Op = entry.parent
        if status == BLKIF_RSP_OKAY and entry.staging is not None:
            # The common case, kept short: persistent grants, success.
            buf = entry.staging
            view = buf.view
            if entry.rsp_op == BLKIF_OP_READ and view is not None:
                base = entry.start * PAGE_SIZE
                source = view[base : base + entry.nbytes]
                if op.dest is None:
                    op.result = bytes(source)
                else:
                    op.dest[entry.offset : entry.offset + entry.nbytes] = source
            elif entry.rsp_op == BLKIF_OP_READ:
                data = self._copy_out(entry, op)
                if data is not None:
                    op.result = data
            buf.give(entry.start, entry.npages)
            op.remaining -= 1
            if op.remaining == 0:
                self._finish(op)
            return
        error: BaseException | None = None
        data = None
        if status == BLKIF_RSP_OKAY:
            if entry.rsp_op == BLKIF_OP_READ:
                data = self._copy_out(entry, op)
        else:
            self.stats["errors"] += 1
            if status == BLKIF_RSP_EOPNOTSUPP:
                # Linux blkfront: the feature is advertised but not supported after all;
                # stop sending it.
                if entry.rsp_op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
                    self._flush_op = None
                    self.info = self._describe()
                elif entry.rsp_op == BLKIF_OP_DISCARD:
                    self._discard = self._discard_secure = False
                    self.info = self._describe()
                error = RequestFailed("response.eopnotsupp", f"the backend does not support operation {entry.rsp_op}")
            else:
                error = RequestFailed(
                    "response.error", f"the backend failed operation {entry.rsp_op} at sector {entry.sector}"
                )
        if not self._release(entry):
            error = DeviceFailed("grant.still_mapped", "the backend still maps a page after its response (XSA-396)")
            data = None
        if error is not None and op.error is None:
            op.error = error
        if data is not None:
            op.result = data
        op.remaining -= 1
        if op.remaining == 0:
            self._finish(op)
        if isinstance(error, DeviceFailed):
            self._fail(error.rule, error.detail)

    def _copy_out(self, entry: InFlight, op: _Op) -> bytes | None:
        nbytes = entry.nbytes
        if self._persistent:
            buf = entry.staging
            base = entry.start * PAGE_SIZE
            if buf.view is not None:
                source = buf.view[base : base + nbytes]
                if op.dest is None:
                    return bytes(source)
                op.dest[entry.offset : entry.offset + nbytes] = source
                return None
            pages = [buf.pages[entry.start + i] for i in range(-(-nbytes // PAGE_SIZE))]
        else:
            allocator = self._allocator
            assert allocator is not None
            pages = [allocator.page(seg.gref) for seg in entry.dma_map.segments]
        out = bytearray(nbytes) if op.dest is None else None
        dest = memoryview(out) if out is not None else op.dest[entry.offset : entry.offset + nbytes]
        for index in range(0, nbytes, PAGE_SIZE):
            size = min(PAGE_SIZE, nbytes - index)
            dest[index : index + size] = pages[index // PAGE_SIZE][:size]
        return bytes(out) if out is not None else None

    def _release(self, entry: InFlight) -> bool:
        """Give the request's pages back. False if a grant could not be revoked (XSA-396:
        the page is quarantined by grant-DMA and never reused)."""
        if entry.npages == 0:
            return True
        if self._persistent:
            entry.staging.give(entry.start, entry.npages)
            return True
        dma_map = entry.dma_map
        entry.dma_map = None
        try:
            still = dma_map.unload()
        except (GrantDmaError, PlatformError):
            return False
        dma_map.destroy()
        return not still

    def _finish(self, op: _Op) -> None:
        if op.error is not None:
            op.future._finish(None, op.error)
        elif op.kind == BLKIF_OP_READ:
            op.future._finish(bytes(op.result) if op.whole else op.result, None)
        else:
            op.future._finish(None, None)

    def _run_backlogs(self) -> None:
        for queue in self._queues:
            backlog = queue.backlog
            while backlog and self._status == "connected":
                if not self._start(queue, backlog[0]):
                    break
                backlog.popleft()

    def _check_deadlines(self, now: float) -> None:
        if self._status != "connected":
            return
        for queue in self._queues:
            for entry in queue.shadow:
                if entry is not None and entry.deadline and entry.deadline < now:
                    self._fail(
                        "response.timeout",
                        f"queue {queue.index}: no response to request {entry.id:#x} "
                        f"within {self.config.request_timeout:g} s",
                    )
                    return

    def _watch_event(self) -> None:
        """The backend's state changed while we run: resize, or it is going away."""
        watch = self._watch
        if watch is None or not watch.drain():
            return
        try:
            state = watch.read()
            step = self._hs.peer_changed(state)
        except (FeatureError, XenbusError) as err:
            self._fail(getattr(err, "rule", "backend.state"), f"backend state: {err}")
            return
        try:
            self._feed(step)
        except (BlkfrontError, XenstoreError) as err:
            self._fail(getattr(err, "rule", "xenstore"), str(err))

    # ------------------------------------------------------------------------------------
    # Failure and close
    # ------------------------------------------------------------------------------------

    def _fail(self, rule: str, detail: str) -> None:
        """Enter the error state: fail everything in flight or waiting, tell the backend
        (Closing). Pages of requests in flight are left alone: the backend may still map
        them, and they are never handed out again (XSA-396)."""
        if self._failure is not None or self._status in ("closed",):
            return
        self._failure = (rule, detail)
        was_connected = self._status == "connected"
        self._status = "failed"
        ops: dict[int, _Op] = {}
        for queue in self._queues:
            for entry in queue.entries():
                if entry.dma_map is not None and entry.dma_map.pending:
                    entry.dma_map.unload()  # a deferred load holds no refs: cancel it
                    entry.dma_map.destroy()
                    entry.dma_map = None
                ops[id(entry.parent)] = entry.parent
                queue.shadow[entry.slot] = None
            for entry in queue.backlog:
                ops[id(entry.parent)] = entry.parent
            queue.backlog.clear()
            queue.in_flight = 0
        for op in ops.values():
            if not op.future.done():
                op.future._finish(None, DeviceFailed(rule, detail))
        if was_connected and self._hs is not None and self._hs.state != XenbusState.Closed:
            try:
                step = self._hs.milestone(Milestone.error)
                if step.new_state is not None:
                    write_state(self._xs, self.frontend_path, step.new_state)
            except (XenbusError, PlatformError):
                pass

    def close(self) -> None:
        """Finish (or fail) what is in flight, close the handshake, release every grant.

        The rings and pages are unshared only after the backend reached Closed (it has
        unmapped them), or after close_timeout; a page it still maps is then left shared for
        good rather than reused (XSA-396), counted in `close_report["leaked_pages"]`.
        """
        if self._status == "closed":
            return
        cfg = self.config
        if self._status == "connected" and not self._on_completion_thread():
            with contextlib.suppress(BlkfrontError):
                self.drain(cfg.close_timeout)
        self._stop_thread()
        with self._lock:
            if self._status == "connected" and self._busy():
                self._fail("device.closed", "closed with requests in flight")
            self._close_handshake()
            self._release_all()
            self._status = "closed"

    def _wake(self) -> None:
        """Make the completion thread re-check every ring now (blkfront_batch asks)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _stop_thread(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if thread is not threading.current_thread():
            thread.join(self.config.close_timeout)
        self._thread = None

    def _close_handshake(self) -> None:
        hs, watch, xs = self._hs, self._watch, self._xs
        if hs is None or watch is None or xs is None:
            return
        granted = self._rings_granted
        deadline = time.monotonic() + self.config.close_timeout
        try:
            if hs.state not in (XenbusState.Closing, XenbusState.Closed):
                step = hs.milestone(Milestone.close_requested)
                if step.new_state is not None:
                    write_state(xs, self.frontend_path, step.new_state)
            if not granted:
                # Nothing was ever granted to the backend: nothing to wait for.
                write_state(xs, self.frontend_path, XenbusState.Closed)
                return
            # Closing -> (backend Closing or Closed) -> we write Closed -> backend unmaps and
            # writes Closed. Only then are our pages safe to release.
            while True:
                state = watch.read()
                if hs.state != XenbusState.Closed:
                    step = hs.peer_changed(state)
                    if step.new_state is not None:
                        write_state(xs, self.frontend_path, step.new_state)
                if hs.state == XenbusState.Closed and state in (XenbusState.Closed, XenbusState.Unknown):
                    self.close_report["backend_closed"] = True
                    return
                if not watch.wait_event(deadline):
                    self.close_report["backend_closed"] = False
                    self.close_report["backend_state"] = state.name
                    if hs.state != XenbusState.Closed:
                        write_state(xs, self.frontend_path, XenbusState.Closed)
                    return
        except (XenbusError, FeatureError, PlatformError) as err:
            self.close_report["handshake_error"] = str(err)
            with contextlib.suppress(PlatformError):
                write_state(xs, self.frontend_path, XenbusState.Closed)

    def _release_all(self) -> None:
        leaked = 0
        still_mapped = 0
        try:
            if self._staging is not None:
                with contextlib.suppress(GrantDmaError, PlatformError):
                    still_mapped += self._staging.unload()
            for queue in self._queues:
                for entry in queue.shadow:  # only after a close with nothing failed
                    if entry is not None and entry.dma_map is not None:
                        with contextlib.suppress(GrantDmaError, PlatformError):
                            still_mapped += len(entry.dma_map.unload())
            if self._allocator is not None:
                leaked += self._allocator.close()
            for queue in self._queues:
                queue.ring.shared.release()
                try:
                    self._gntshr.unshare(queue.pages)
                except PlatformError:
                    leaked += len(queue.pages.refs)
                with contextlib.suppress(PlatformError):
                    self._evtchn.unbind(queue.port)
        finally:
            self.close_report["leaked_pages"] = leaked
            self.close_report["still_mapped"] = still_mapped
            for handle in (self._evtchn, self._gntshr):
                if handle is not None:
                    with contextlib.suppress(PlatformError):
                        handle.close()
            if self._watch is not None:
                self._watch.close()
            if self._xs is not None:
                with contextlib.suppress(PlatformError):
                    self._xs.close()
            self._evtchn = self._gntshr = self._xs = None
            self._watch = None
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def __enter__(self) -> BlkFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BlkFront({self.frontend_path!r}, {self._status})"


def _byte_view(data: Any, *, writable: bool) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError:
        raise BlkfrontError("request.buffer", f"{type(data).__name__} is not a bytes-like object") from None
    if writable and view.readonly:
        raise BlkfrontError("request.buffer", "readinto needs a writable buffer")
    if not view.c_contiguous:
        raise BlkfrontError("request.buffer", "the buffer is not contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view

