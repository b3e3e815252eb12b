"""blkfront: a userspace blkif frontend with a block-device API.

Owns: `BlkFront`, one virtual block device seen from the frontend domain: driving the xenbus
handshake (xentools.core.xenbus.Handshake: its table is the device's lifecycle), turning
user operations into requests and completions into results, failure and close. Its parts:
the rings (blkfront_rings.RingSet), the data grants (blkfront_grants.GrantStaging), the
request builder (blkfront_requests.RequestBuilder), the completion thread
(blkfront_completion), and one teardown path (blkfront_teardown.Teardown). Re-exports the
public types of blkfront_types (BlkfrontConfig, BlkFuture, DeviceInfo and the errors).
Must not: know whether the platform is real Xen or the software Xen (it uses only
xentools.platform.interface), trust anything the backend writes (XSA-376), or release a
resource anywhere but through its Teardown.

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
    dev.info (DeviceInfo), dev.stats, dev.status, dev.close()

Lifecycle: our xenbus state is the Handshake's; beside it the device keeps only facts, no
second state machine: whether I/O started (the request builder exists once Connected and
set up), the failure (rule, detail) if any, and whether the teardown ran. `status` names
the result: new, connecting, connected, failed or closed.

Batching: requests are written to ring slots as they are submitted and published with one
RING_PUSH_REQUESTS_AND_CHECK_NOTIFY per queue at the end of the submitting call, of a
`batch()` block, or of a completion pass (callbacks that submit more are pushed together);
the backend is notified only when that push crosses its req_event (ring.h). (Publishing
every few requests inside a pass, to overlap with the backend, measured no faster here.)

Buffers: a userspace frontend copies through pages it shares with the backend (XSA-403;
blkfront_pool, blkfront_grants). Persistent grants: runs of long-lived DmaMaps, the same refs
again and again. Otherwise a grant-DMA DmaMap per request, loaded when refs are free
(deferred otherwise) and unloaded on the response, asking the platform whether the backend
still maps a page before it is reused (XSA-396). Everything stays within `max_grants` (ring
pages + indirect pages + data pages), and with persistent grants the data and indirect pages
stay within `max_persistent_grants` (the backend's persistent-grant cache per ring, 1056 in
Linux blkback: a frontend cycling through more pages makes the backend map and unmap on
every request); a request never needs more than half the pool, and requests that wait for
pages nothing in flight will free fail ("grants.exhausted") instead of hanging.

Failure (Linux 5.16 blkfront after XSA-376/391/396): any response that breaks a rule, a
response that never comes (request_timeout), a grant the backend still maps after its
response, or the backend leaving Connected puts the device in its error state: every request
in flight and every later one fails with DeviceFailed, nothing is returned as success, and
the xenbus state goes to Closing. Pages of requests that were in flight are never reused.
An event with no response behind it is spurious and only counted (XSA-391); a storm of them
is throttled, not fatal. Events are taken by the completion thread, or (one pass each, the
same `_pass`, unmasked after it) by a batch caller that sleeps on the event channel itself
while every request of its queue is the batch's (blkfront_batch).

Close (Linux's blkif_free is one path; so is this): finish or fail what is in flight, stop
the completion thread, close the handshake (the backend unmaps before it writes Closed),
then the Teardown releases every resource in the reverse order of acquisition, each once,
every release attempted even if one fails; failures are listed in
`close_report["teardown_errors"]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_OKAY,
    codec_for,
)
from xentools.core.errors import FeatureError, XenbusError
from xentools.core.features import (
    DiskInfo,
    FrontendPreferences,
    FrontendToolstackKeys,
    Negotiated,
    negotiate,
)
from xentools.core.xenbus import Action, Handshake, Milestone, Step, XenbusState
from xentools.devices.blkfront_completion import CompletionThread
from xentools.devices.blkfront_grants import GrantStaging
from xentools.devices.blkfront_queue import BlkfrontQueue, InFlight
from xentools.devices.blkfront_requests import RequestBuilder
from xentools.devices.blkfront_rings import RingSet
from xentools.devices.blkfront_teardown import Teardown
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

_DEADLINE_CHECK = 0.25  # seconds between scans for requests past their deadline
_POLL_MS = 250
_POLL_MS_NO_BARRIER = 10  # without a full barrier the ring is re-checked this often
_STORM_STREAK = 64  # spurious events in a row before unmasking is delayed (XSA-391)
_STORM_DELAY = 0.002
_OWNED_POLL_MS = 10  # while a batch caller waits on the event channel itself (blkfront_batch)
# The largest disk, in bytes, a backend may announce: every byte needs a signed 64-bit file
# offset (Linux's MAX_LFS_FILESIZE); 2^64 - 1 sectors is a backend's lie, not a disk.
MAX_DISK_BYTES = (1 << 63) - 1


class _Op:
    """One user-level operation: one future, one or more blkif requests (chunks)."""

    __slots__ = ("future", "chunks_left", "dest", "result", "error", "kind", "src", "whole")

    def __init__(self, future: BlkFuture, kind: int, chunks: int) -> None:
        self.future = future
        self.kind = kind
        self.chunks_left = chunks  # requests of this operation without a response yet
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
        # .depth: how deep this thread is in submitting calls, batch() blocks and completion
        # passes; the outermost one pushes the rings.
        self._submitting = threading.local()
        # The lifecycle: the handshake (None until connect()), the failure, the teardown.
        self._handshake: Handshake | None = None
        self._failure: tuple[str, str] | None = None
        self._teardown = Teardown()
        # Platform handles, each registered with the teardown when opened.
        self._xenstore: Any = None
        self._backend_watch: BackendStateWatch | None = None
        self._gntshr: Any = None
        self._evtchn: Any = None
        # What the handshake learnt: the toolstack's keys, the transport negotiated when the
        # rings were granted, the I/O features negotiated at Connected, the disk.
        self._toolstack: FrontendToolstackKeys | None = None
        self._transport: Negotiated | None = None
        self._features: Negotiated | None = None
        self._disk: DiskInfo | None = None
        # The parts; the request builder and the grants exist once I/O started.
        self._rings = RingSet()
        self._grants: GrantStaging | None = None
        self._requests: RequestBuilder | None = None
        self._completion = CompletionThread(f"blkfront {frontend_path}")
        self._teardown.on_close("completion wake pipe", self._completion.close)
        self._spurious_streak = 0  # events in a row with no response behind them (XSA-391)
        # A BatchIO whose caller waits on the event channel itself (blkfront_batch): while
        # set, the completion thread takes no event and leaves that batch's queue alone.
        self._event_waiter: Any = None
        self._next_deadline_scan = 0.0
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
    # Lifecycle
    # ------------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """new, connecting, connected, failed or closed (see the module docstring)."""
        if self._teardown.closed:
            return "closed"
        if self._failure is not None:
            return "failed"
        if self._requests is not None:
            return "connected"
        return "new" if self._handshake is None else "connecting"

    @property
    def _connected(self) -> bool:
        """I/O started, nothing failed, not closed: requests may be submitted."""
        return self._requests is not None and self._failure is None and not self._teardown.closed

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
        if self.status != "new":
            raise BlkfrontError("device.state", f"connect() on a device that is {self.status}")
        self._handshake = handshake = Handshake("frontend")
        cfg = self.config
        self._xenstore = xs = self.platform.open_xenstore(timeout=cfg.connect_timeout)
        self._teardown.on_close("xenstore connection", xs.close)
        try:
            self._toolstack = tool = read_toolstack(xs, self.frontend_path)
        except FeatureError as err:
            raise feature_error(err, f"frontend directory {self.frontend_path}") from None
        backend = tool.backend
        write_state(xs, self.frontend_path, XenbusState.Initialising)
        self._backend_watch = watch = BackendStateWatch(xs, backend, f"blkfront:{self.frontend_path}")
        self._teardown.on_close("backend state watch", watch.close)
        deadline = time.monotonic() + cfg.connect_timeout
        while True:
            try:
                state = watch.read()
            except FeatureError as err:
                raise feature_error(err, f"backend {backend}") from None
            self._feed(self._handshake_step(lambda: handshake.peer_changed(state)))
            if handshake.state == XenbusState.Connected:
                break
            if handshake.state in (XenbusState.Closing, XenbusState.Closed):
                raise BlkfrontError(
                    "connect.backend_closed",
                    f"backend {backend} went to {state.name} during the handshake"
                    + backend_error(xs, backend),
                )
            if not watch.wait_event(deadline):
                what = "Connected" if self._rings.published else "InitWait"
                raise timeout_error(what, watch, cfg.connect_timeout)
        self._start_io()

    def _handshake_step(self, fn) -> Step:
        try:
            return fn()
        except XenbusError as err:
            raise BlkfrontError(err.rule, err.detail) from None

    def _feed(self, step: Step) -> None:
        """Carry out one Step: actions in order, then the state write; milestones the actions
        reached are fed afterwards, one at a time (xenbus.py's rule)."""
        milestones: list[Milestone] = []
        for action in step.actions:
            milestone = self._perform(action)
            if milestone is not None:
                milestones.append(milestone)
        if step.new_state is not None:
            write_state(self._xenstore, self.frontend_path, step.new_state)
        for milestone in milestones:
            self._feed(self._handshake_step(lambda m=milestone: self._handshake.milestone(m)))

    def _perform(self, action: Action) -> Milestone | None:
        if action is Action.read_backend_features_and_connect:
            self._grant_rings()
            return Milestone.rings_granted
        if action is Action.read_disk_info:
            self._read_disk()
            return Milestone.disk_info_read
        if action in (Action.disconnect, Action.teardown):
            if self._connected:
                self._fail("backend.closed", f"backend {self._toolstack.backend} left Connected")
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
        if self._rings.queues:
            raise BlkfrontError("connect.rings", "the backend asked for rings twice")
        tool = self._toolstack
        try:
            features = read_backend_features(self._xenstore, tool.backend)
        except FeatureError as err:
            raise feature_error(err, f"backend {tool.backend}") from None
        transport = negotiate(features, self._preferences())
        ring_grants = transport.num_queues * transport.ring_pages
        if self.config.max_grants - ring_grants < 4 * BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BlkfrontError(
                "grants.budget",
                f"{transport.num_queues} rings of {transport.ring_pages} pages leave too few of the "
                f"{self.config.max_grants} grants for data",
            )
        codec = codec_for(ABIS[self.config.protocol])
        self._gntshr = gntshr = self.platform.open_gntshr()
        self._teardown.on_close("grant sharer", gntshr.close)
        self._evtchn = evtchn = self.platform.open_evtchn()
        self._teardown.on_close("event channels", evtchn.close)
        self._rings.grant(gntshr, evtchn, tool.backend_id, transport, codec, self.platform.full_barrier, self._teardown)
        info = self._rings.ring_info(transport, self.config.protocol)
        # feature-persistent is the frontend's own wish (blkif.h), written whatever the
        # backend showed so far: Linux blkback advertises it only when it connects, and
        # uses persistent grants only if the frontend's key said so before. Whether we
        # reuse grants is decided at Connected (both sides said 1: _read_disk's negotiate).
        info = dataclasses.replace(info, feature_persistent=self.config.persistent)
        write_ring_info(self._xenstore, self.frontend_path, info)
        self._rings.published = True
        self._transport = transport

    def _read_disk(self) -> None:
        """read_disk_info: the disk (and, as Linux blkback publishes them only now, the I/O
        features). Again while connected: the backend announces a resize."""
        backend = self._toolstack.backend
        try:
            disk = read_disk_info(self._xenstore, backend)
            disk.validate(feature_large_sector_size=self.config.large_sector_size)
            features = read_backend_features(self._xenstore, backend)
        except FeatureError as err:
            raise feature_error(err, f"backend {backend}") from None
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
        self._features = negotiate(features, self._preferences())

    # ------------------------------------------------------------------------------------
    # I/O setup
    # ------------------------------------------------------------------------------------

    def _start_io(self) -> None:
        transport, features, disk, tool = self._transport, self._features, self._disk, self._toolstack
        assert transport is not None and features is not None and disk is not None and tool is not None
        data_pages = self.config.max_grants - transport.num_queues * transport.ring_pages
        if features.persistent:
            # Never more pages than the backend's persistent-grant cache holds (per ring; the
            # pool is shared by the rings, so no ring sees more): beyond it, the backend
            # would map and unmap for every request.
            data_pages = min(data_pages, self.config.max_persistent_grants)
        requests = RequestBuilder(
            # blkif_vdev_t is u16; Linux puts the device number there, truncated.
            handle=tool.virtual_device & 0xFFFF,
            sector_size=disk.sector_size,
            max_indirect_segments=transport.max_indirect_segments,
            data_pages=data_pages,
            features=features,
            stats=self.stats,
        )
        self._grants = GrantStaging(
            self._gntshr, tool.backend_id, persistent=features.persistent, data_pages=data_pages,
            max_request_pages=requests.max_request_pages, sectors_per_page=requests.sectors_per_page,
            teardown=self._teardown,
        )
        self._requests = requests  # from here on the device is connected
        self.info = self._describe()
        self._completion.start(self._run)

    def _describe(self) -> DeviceInfo:
        transport, features, disk = self._transport, self._features, self._disk
        requests, grants, tool = self._requests, self._grants, self._toolstack
        assert transport is not None and features is not None and disk is not None
        assert requests is not None and grants is not None and tool is not None
        return DeviceInfo(
            frontend_path=self.frontend_path,
            backend_path=tool.backend,
            backend_id=tool.backend_id,
            virtual_device=tool.virtual_device,
            protocol=self.config.protocol,
            sectors=disk.sectors,
            sector_size=disk.sector_size,
            physical_sector_size=disk.physical_sector_size or disk.sector_size,
            readonly=disk.readonly,
            cdrom=disk.cdrom,
            removable=disk.removable,
            ring_page_order=transport.ring_page_order,
            ring_entries=self._rings.queues[0].size,
            num_queues=transport.num_queues,
            max_indirect_segments=transport.max_indirect_segments,
            segments_per_request=requests.segments_per_request,
            persistent=grants.persistent,
            large_sector_size=features.large_sector_size,
            flush_cache=requests.flush_op == BLKIF_OP_FLUSH_DISKCACHE,
            barrier=requests.flush_op == BLKIF_OP_WRITE_BARRIER,
            discard=requests.discard,
            discard_secure=requests.discard_secure,
            max_grants=self.config.max_grants,
            data_pages=grants.data_pages,
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
        return self._requests.sector_size

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
            flush_op = self._requests.flush_op
            if flush_op is None:
                fut._finish(None, None)
                return fut
            op = _Op(fut, flush_op, 1)
            entry = InFlight()
            entry.op = entry.rsp_op = flush_op
            entry.parent = op
            self._dispatch(self._rings.next_queue(), entry)
            self._maybe_push()
            return fut

    def submit_discard(self, sector: int, nr_sectors: int, *, secure: bool = False, callback=None) -> BlkFuture:
        """BLKIF_OP_DISCARD of nr_sectors from sector (needs feature-discard; secure needs
        discard-secure). Raises BlkfrontError "discard.unsupported" otherwise."""
        with self._lock:
            self._check_usable()
            self._check_range(sector, nr_sectors)
            if not self._requests.discard:
                raise BlkfrontError("discard.unsupported", "the backend does not offer feature-discard")
            if secure and not self._requests.discard_secure:
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
            self._dispatch(self._rings.next_queue(), entry)
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
            sector_size = self._requests.sector_size
            depth = getattr(self._submitting, "depth", 0)
            self._submitting.depth = depth + 1
            try:
                return [
                    self._submit_rw(kind, sector, view.nbytes // sector_size, view, None)
                    for sector, view in views
                ]
            finally:
                self._submitting.depth = depth
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
        depth = getattr(self._submitting, "depth", 0)
        self._submitting.depth = depth + 1
        try:
            yield self
        finally:
            self._submitting.depth = depth
            if depth == 0:
                with self._lock:
                    self._push_all()

    def drain(self, timeout: float | None = None) -> None:
        """Wait until no request is in flight or waiting (or the device failed)."""
        limit = timeout if timeout is not None else self.config.request_timeout + 5.0
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                if not self._connected or not self._rings.busy():
                    return
                if self._on_completion_thread():
                    raise BlkfrontError("future.wait_in_callback", "a completion callback cannot drain")
            if time.monotonic() > deadline:
                raise BlkfrontError("drain.timeout", f"requests still in flight after {limit:g} s")
            time.sleep(0.001)

    # ------------------------------------------------------------------------------------
    # Building requests
    # ------------------------------------------------------------------------------------

    def _whole_sectors(self, nbytes: int) -> int:
        self._require_info()
        sector_size = self._requests.sector_size
        if nbytes == 0 or nbytes % sector_size:
            raise BlkfrontError("request.length", f"{nbytes} bytes is not a whole number of {sector_size}-byte sectors")
        return nbytes // sector_size

    def _check_usable(self) -> None:
        status = self.status
        if status == "failed":
            assert self._failure is not None
            raise DeviceFailed(*self._failure)
        if status != "connected":
            raise BlkfrontError("device.not_connected", f"the device is {status}")

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

    def _submit_rw(self, kind: int, sector: int, nr_sectors: int, view: memoryview | None, callback) -> BlkFuture:
        with self._lock:
            if not self._connected:
                self._check_usable()
            disk_sectors = self._disk.sectors
            if (
                type(sector) is not int or type(nr_sectors) is not int
                or sector < 0 or nr_sectors < 1 or sector + nr_sectors > disk_sectors
            ):
                self._check_range(sector, nr_sectors)
            if kind == BLKIF_OP_WRITE and self.info.readonly:
                raise BlkfrontError("request.readonly", "the disk is read-only")
            requests = self._requests
            next_queue = self._rings.next_queue
            nbytes = nr_sectors * requests.sector_size
            chunk = requests.chunk_bytes
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
                entry.npages = requests.pages_for(nbytes)
                self._dispatch(next_queue(), entry)
                if getattr(self._submitting, "depth", 0) == 0:
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
            chunk_sectors = chunk // requests.sector_size
            offset = 0
            for index in range(nchunks):
                entry = InFlight()
                entry.op = entry.rsp_op = kind
                entry.parent = op
                entry.offset = offset
                entry.sector = sector + index * chunk_sectors
                size = min(chunk, nbytes - offset)
                entry.nbytes = size
                entry.npages = requests.pages_for(size)
                offset += size
                self._dispatch(next_queue(), entry)
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
        to share more pages). Fail instead of hanging. Not while a read_many's compiled
        stream carries a queue: it gives way within a round, and the backlog starts then."""
        if any(queue.batch is not None and queue.batch.stream is not None for queue in self._rings.queues):
            return
        waiting = False
        for queue in self._rings.queues:
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
        grants, on the grant-DMA layer's wait list). False: wait in the backlog (also while
        a read_many's compiled stream carries the queue: it is told to give way)."""
        batch = queue.batch
        if batch is not None and batch.stream is not None:
            batch.give_way()
            return False
        if not queue.claim_slot(entry):
            return False
        if queue.in_flight > self.stats["max_in_flight"]:
            self.stats["max_in_flight"] = queue.in_flight
        if entry.npages == 0:
            self._put(queue, entry, self._requests.bare(queue.codec, entry))
            return True
        grants = self._grants
        if grants.persistent:
            if not grants.take_run(entry):
                queue.release_slot(entry)
                return False
            if entry.op == BLKIF_OP_WRITE:
                grants.copy_in_run(entry, entry.parent.src[entry.offset : entry.offset + entry.nbytes])
            self._put(queue, entry, self._requests.from_run(queue.codec, entry, entry.staging, entry.start))
            return True
        if grants.load(entry, queue.index, functools.partial(self._loaded, queue, entry)):
            # Holds its slot; the grant-DMA layer calls back when refs are freed.
            self.stats["deferred_loads"] += 1
        return True

    def _put(self, queue: BlkfrontQueue, entry: InFlight, request: bytes | bytearray) -> None:
        entry.deadline = time.monotonic() + self.config.request_timeout
        queue.put(request)
        self.stats["requests"] += 1

    def _loaded(self, queue: BlkfrontQueue, entry: InFlight, segments) -> None:
        """Grant-DMA load callback (per-request grants): the refs are bound; build and put
        the request. May run later, from a free() during a completion pass."""
        if not self._connected or queue.shadow[entry.slot] is not entry:
            return  # the device failed meanwhile; the map is dealt with at close
        grants = self._grants
        grefs = [seg.gref for seg in segments]
        if entry.op == BLKIF_OP_WRITE:
            grants.copy_in_grants(grefs, entry.parent.src[entry.offset : entry.offset + entry.nbytes])
        self._put(queue, entry, self._requests.from_grants(queue.codec, entry, grefs, grants.allocator.page))
        queue.unpushed = True

    def _maybe_push(self) -> None:
        if getattr(self._submitting, "depth", 0) == 0:
            self._push_all()

    def _push_all(self) -> None:
        for queue in self._rings.queues:
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
        return self._completion.running_here()

    def _run(self) -> None:
        completion = self._completion
        poller = select.poll()
        evtchn_fd = self._evtchn.fileno()
        xs_fd = self._xenstore.fileno()
        wake_fd = completion.wake_fd
        for fd in (evtchn_fd, xs_fd, wake_fd):
            poller.register(fd, select.POLLIN)
        listening = True  # evtchn_fd registered
        interval = _POLL_MS if self.platform.full_barrier is not None else _POLL_MS_NO_BARRIER
        try:
            while not completion.stopping:
                # While a batch caller waits on the event channel itself, this thread does
                # not poll it (one wake-up per event, not two); it looks again soon after.
                owned = self._event_waiter is not None
                if owned == listening:
                    if owned:
                        poller.unregister(evtchn_fd)
                    else:
                        poller.register(evtchn_fd, select.POLLIN)
                    listening = not owned
                ready = {fd for fd, _ in poller.poll(_OWNED_POLL_MS if owned else interval)}
                if wake_fd in ready:
                    completion.take_wakeups()
                # A quiet interval re-checks every ring: a notification lost on the way (or
                # never sent by a backend that read a stale rsp_event) costs one interval.
                ports = self._pass(xs_fd in ready, recheck=not ready or wake_fd in ready)
                if ports is None:
                    continue
                self._unmask_events(ports)
        except BaseException as err:  # never leave futures waiting on a dead thread
            with self._lock:
                self._fail("frontend.internal", f"completion thread stopped: {err!r}")

    def _unmask_events(self, ports: list[int]) -> None:
        """Unmask the ports whose events were handled (not under the lock), throttled while
        events keep coming with nothing behind them (XSA-391)."""
        if self._spurious_streak > _STORM_STREAK:
            time.sleep(_STORM_DELAY)  # XSA-391: throttle an event storm
        for port in ports:
            try:
                self._evtchn.unmask(port)
            except PlatformError:
                pass  # the port went away; the next pass notices the failure

    def _pass(self, xs_ready: bool, recheck: bool = False, own: BlkfrontQueue | None = None) -> list[int] | None:
        """One completion pass under the lock: events, responses, backlog, watch, deadlines.
        Returns the ports to unmask (`_unmask_events`; None when stopping). `own`: a batch
        caller's pass on its thread (blkfront_batch, after it slept on the event channel):
        the events and that queue's responses only (the compiled reap, then the Python
        path judging what it left); events of other queues make the completion thread
        re-check every ring."""
        with self._lock:
            if self._completion.stopping:
                return None
            self._submitting.depth = getattr(self._submitting, "depth", 0) + 1
            ports: list[int] = []
            try:
                waiter = self._event_waiter  # its caller takes the events and its queue
                while waiter is None:
                    port = self._evtchn.pending()
                    if port is None:
                        break
                    ports.append(port)
                self.stats["events"] += len(ports)
                work = 0
                if self._connected:
                    rings = self._rings
                    polled = [own] if own is not None else rings.queues if (
                        recheck or self.platform.full_barrier is None
                    ) else (rings.by_port[p] for p in ports if p in rings.by_port)
                    for queue in polled:
                        if waiter is not None and queue is waiter.lanes.queue:
                            continue
                        work += self._process(queue)
                        if not self._connected:
                            break
                if ports and not work:
                    self.stats["spurious_events"] += len(ports)
                    self._spurious_streak += len(ports)
                elif work:
                    self._spurious_streak = 0
                if own is not None and any(port != own.port for port in ports):
                    self._completion.wake()
                if self._connected:
                    self._run_backlogs()
                    if any(q.backlog for q in self._rings.queues):
                        self._check_stalled()
                if xs_ready:
                    self._watch_event()
                now = time.monotonic()
                if now >= self._next_deadline_scan:
                    self._next_deadline_scan = now + _DEADLINE_CHECK
                    self._check_deadlines(now)
            except PlatformError as err:
                self._fail("platform", str(err))
            finally:
                self._submitting.depth -= 1
                if self._connected:
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
        grants = self._grants
        if status == BLKIF_RSP_OKAY and entry.staging is not None:
            # The common case, kept short: persistent grants, success.
            if entry.rsp_op == BLKIF_OP_READ:
                data = grants.copy_out(entry, op.dest)
                if data is not None:
                    op.result = data
            entry.staging.give(entry.start, entry.npages)
            op.chunks_left -= 1
            if op.chunks_left == 0:
                self._finish(op)
            return
        error: BaseException | None = None
        data = None
        if status == BLKIF_RSP_OKAY:
            if entry.rsp_op == BLKIF_OP_READ:
                data = grants.copy_out(entry, op.dest)
        else:
            self.stats["errors"] += 1
            if status == BLKIF_RSP_EOPNOTSUPP:
                # Linux blkfront: the feature is advertised but not supported after all;
                # stop sending it.
                if self._requests.not_supported(entry.rsp_op):
                    self.info = self._describe()
                error = RequestFailed("response.eopnotsupp", f"the backend does not support operation {entry.rsp_op}")
            else:
                error = RequestFailed(
                    "response.error", f"the backend failed operation {entry.rsp_op} at sector {entry.sector}"
                )
        if not grants.release(entry):
            error = DeviceFailed("grant.still_mapped", "the backend still maps a page after its response (XSA-396)")
            data = None
        if error is not None and op.error is None:
            op.error = error
        if data is not None:
            op.result = data
        op.chunks_left -= 1
        if op.chunks_left == 0:
            self._finish(op)
        if isinstance(error, DeviceFailed):
            self._fail(error.rule, error.detail)

    def _finish(self, op: _Op) -> None:
        if op.error is not None:
            op.future._finish(None, op.error)
        elif op.kind == BLKIF_OP_READ:
            op.future._finish(bytes(op.result) if op.whole else op.result, None)
        else:
            op.future._finish(None, None)

    def _run_backlogs(self) -> None:
        for queue in self._rings.queues:
            backlog = queue.backlog
            while backlog and self._connected:
                if not self._start(queue, backlog[0]):
                    break
                backlog.popleft()

    def _check_deadlines(self, now: float) -> None:
        if not self._connected:
            return
        for queue in self._rings.queues:
            for entry in queue.shadow:
                # Read once: a batch's compiled wait completes its lanes without the lock.
                deadline = entry.deadline if entry is not None else 0
                if deadline and deadline < now:
                    self._fail(
                        "response.timeout",
                        f"queue {queue.index}: no response to request {entry.id:#x} "
                        f"within {self.config.request_timeout:g} s",
                    )
                    return

    def _watch_event(self) -> None:
        """The backend's state changed while we run: resize, or it is going away."""
        watch = self._backend_watch
        if watch is None or not watch.drain():
            return
        try:
            state = watch.read()
            step = self._handshake.peer_changed(state)
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
        if self._failure is not None or self._teardown.closed:
            return
        was_connected = self._connected
        self._failure = (rule, detail)
        ops: dict[int, _Op] = {}
        for queue in self._rings.queues:
            for entry in queue.entries():
                if self._grants is not None:
                    self._grants.abandon(entry)
                ops[id(entry.parent)] = entry.parent
                queue.shadow[entry.slot] = None
            for entry in queue.backlog:
                ops[id(entry.parent)] = entry.parent
            queue.backlog.clear()
            queue.in_flight = 0
        for op in ops.values():
            if not op.future.done():
                op.future._finish(None, DeviceFailed(rule, detail))
        handshake = self._handshake
        if was_connected and handshake is not None and handshake.state != XenbusState.Closed:
            try:
                step = handshake.milestone(Milestone.error)
                if step.new_state is not None:
                    write_state(self._xenstore, self.frontend_path, step.new_state)
            except (XenbusError, PlatformError):
                pass

    def close(self) -> None:
        """Finish (or fail) what is in flight, close the handshake, release every resource.

        The rings and pages are unshared only after the backend reached Closed (it has
        unmapped them), or after close_timeout; a page it still maps is then left shared for
        good rather than reused (XSA-396), counted in `close_report["leaked_pages"]`. A
        release that failed is listed in `close_report["teardown_errors"]`.
        """
        if self._teardown.closed:
            return
        cfg = self.config
        if self._connected and not self._on_completion_thread():
            with contextlib.suppress(BlkfrontError):
                self.drain(cfg.close_timeout)
        self._completion.stop(cfg.close_timeout)
        with self._lock:
            while self._event_waiter is not None:  # a batch's compiled wait uses the ring: <= 50 ms
                state = self._lock._release_save()  # type: ignore[attr-defined]
                time.sleep(0.001)
                self._lock._acquire_restore(state)  # type: ignore[attr-defined]
            if self._connected and self._rings.busy():
                self._fail("device.closed", "closed with requests in flight")
            try:
                self._close_handshake()
            finally:
                errors = self._teardown.close()
                grants = self._grants
                self.close_report["leaked_pages"] = self._rings.leaked_pages + (grants.leaked_pages if grants else 0)
                self.close_report["still_mapped"] = grants.still_mapped if grants else 0
                if errors:
                    self.close_report["teardown_errors"] = list(errors)

    def _close_handshake(self) -> None:
        handshake, watch, xs = self._handshake, self._backend_watch, self._xenstore
        if handshake is None or watch is None or xs is None:
            return
        deadline = time.monotonic() + self.config.close_timeout
        try:
            if handshake.state not in (XenbusState.Closing, XenbusState.Closed):
                step = handshake.milestone(Milestone.close_requested)
                if step.new_state is not None:
                    write_state(xs, self.frontend_path, step.new_state)
            if not self._rings.published:
                # Nothing was ever granted to the backend: nothing to wait for.
                write_state(xs, self.frontend_path, XenbusState.Closed)
                return
            # Closing -> (backend Closing or Closed) -> we write Closed -> backend unmaps and
            # writes Closed. Only then are our pages safe to release.
            while True:
                state = watch.read()
                if handshake.state != XenbusState.Closed:
                    step = handshake.peer_changed(state)
                    if step.new_state is not None:
                        write_state(xs, self.frontend_path, step.new_state)
                if handshake.state == XenbusState.Closed and state in (XenbusState.Closed, XenbusState.Unknown):
                    self.close_report["backend_closed"] = True
                    return
                if not watch.wait_event(deadline):
                    self.close_report["backend_closed"] = False
                    self.close_report["backend_state"] = state.name
                    if handshake.state != XenbusState.Closed:
                        write_state(xs, self.frontend_path, XenbusState.Closed)
                    return
        except (XenbusError, FeatureError, PlatformError) as err:
            self.close_report["handshake_error"] = str(err)
            with contextlib.suppress(PlatformError):
                write_state(xs, self.frontend_path, XenbusState.Closed)

    def __enter__(self) -> BlkFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BlkFront({self.frontend_path!r}, {self.status})"


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

