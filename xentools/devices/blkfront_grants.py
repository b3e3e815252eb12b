"""blkfront's grant staging: the data pages of one connected device's requests.

Owns: `GrantStaging`, the device's data grants and its choice between persistent grants
(runs of a StagingArea, the same refs again and again) and per-request grants (a grant-DMA
DmaMap loaded per request, unloaded on its response, deferred when refs are short): giving a
request its pages, copying a WRITE's data in and a READ's data out, giving the pages back
(and refusing when the backend still maps one, XSA-396), forgetting the pages of requests
that were in flight when the device failed (never reused), and registering the release of
its pool with the device's Teardown once, when it is created.
Must not: know about rings, request ids or xenstore, or build requests (blkfront_requests);
the pool's page accounting itself is blkfront_pool's.
"""

from __future__ import annotations

from collections.abc import Callable

from xentools.core.blkif import BLKIF_OP_READ
from xentools.core.errors import GrantDmaError
from xentools.core.grant_dma import DmaDirection, DmaFlags, DmaMap, DmaTag, LinearBuffer, LoadStatus
from xentools.devices.blkfront_pool import PoolGrantAllocator, StagingArea
from xentools.devices.blkfront_queue import InFlight
from xentools.devices.blkfront_teardown import Teardown
from xentools.platform.interface import PAGE_SIZE, GrantSharer, PlatformError

__all__ = ["GrantStaging"]

_NOMINAL_STRIDE_PAGES = 1 << 13  # nominal address space per request slot (> 4096 + 8 pages)
_MAX_EXTENT_PAGES = 1024  # pages per share() call (platforms bound one call)


class GrantStaging:
    """The data pages of one device: at most `data_pages` grants, shared with `backend_id`.

    `persistent`: requests take runs of long-lived staging buffers; else each request loads
    its own DmaMap (one page per share() so that is_mapped() answers for exactly one page).
    `max_request_pages` is the most pages one request holds (data and indirect pages).
    After the device's teardown, `still_mapped` counts pages the backend still mapped when
    they were unloaded and `leaked_pages` pages left shared for good (XSA-396).
    """

    def __init__(
        self,
        sharer: GrantSharer,
        backend_id: int,
        *,
        persistent: bool,
        data_pages: int,
        max_request_pages: int,
        sectors_per_page: int,
        teardown: Teardown,
    ) -> None:
        self.persistent = persistent
        self.data_pages = data_pages
        self.still_mapped = 0
        self.leaked_pages = 0
        self.staging: StagingArea | None = None
        self.tag: DmaTag | None = None
        self._request_maps: set[DmaMap] = set()  # per-request maps loaded (or waiting for refs)
        if persistent:
            buffer_pages = min(data_pages, max(max_request_pages, 64))
            # One share() per extent; a buffer larger than an extent spans several (and is
            # then copied page by page). 1 MiB requests stay in one contiguous extent.
            self.allocator = PoolGrantAllocator(
                sharer, backend_id, max_pages=data_pages,
                extent_pages=min(buffer_pages, _MAX_EXTENT_PAGES), check_mapped=False,
            )
            teardown.on_close("data grant pool", self._close_pool)
            self.staging = StagingArea(
                self.allocator, backend_id, buffer_pages=buffer_pages, sectors_per_page=sectors_per_page
            )
            teardown.on_close("persistent grants", self._unload_staging)
        else:
            self.allocator = PoolGrantAllocator(
                sharer, backend_id, max_pages=data_pages, extent_pages=1, check_mapped=True
            )
            teardown.on_close("data grant pool", self._close_pool)
            self.tag = DmaTag(self.allocator, domid=backend_id, max_segments=max_request_pages, alignment=512)
            teardown.on_close("request grants", self._unload_requests)

    # -- giving a request its pages -------------------------------------------------------

    def take_run(self, entry: InFlight) -> bool:
        """Persistent grants: a run of `entry.npages` pages for `entry` (False: none free)."""
        got = self.staging.take(entry.npages)
        if got is None:
            return False
        entry.staging, entry.start = got
        return True

    def load(self, entry: InFlight, queue_index: int, on_loaded: Callable[[list], None]) -> bool:
        """Per-request grants: load a DmaMap for `entry`; `on_loaded(segments)` runs when its
        refs are bound (at once, or later from a free()). True if the load was deferred."""
        dma_map = self.tag.create_map()
        entry.dma_map = dma_map
        self._request_maps.add(dma_map)
        direction = DmaDirection.DEVICE_WRITES if entry.op == BLKIF_OP_READ else DmaDirection.DEVICE_READS
        # The request's own nominal address: unique per (queue, slot) (see blkfront_pool).
        base = ((queue_index << 9) | entry.slot) * _NOMINAL_STRIDE_PAGES * PAGE_SIZE
        status = dma_map.load(LinearBuffer(base, entry.npages * PAGE_SIZE), direction, on_loaded, DmaFlags.WAITOK)
        return status is LoadStatus.EINPROGRESS

    # -- data -----------------------------------------------------------------------------

    def copy_in_run(self, entry: InFlight, data: memoryview) -> None:
        """A WRITE's data into its persistent run."""
        buf, start = entry.staging, entry.start
        if buf.view is not None:
            base = start * PAGE_SIZE
            buf.view[base : base + data.nbytes] = data
            return
        for index in range(0, data.nbytes, PAGE_SIZE):
            part = data[index : index + PAGE_SIZE]
            buf.pages[start + index // PAGE_SIZE][: part.nbytes] = part

    def copy_in_grants(self, grefs: list[int], data: memoryview) -> None:
        """A WRITE's data into the pages of its per-request grants, page by page."""
        page = self.allocator.page
        for index in range(0, data.nbytes, PAGE_SIZE):
            part = data[index : index + PAGE_SIZE]
            page(grefs[index // PAGE_SIZE])[: part.nbytes] = part

    def copy_out(self, entry: InFlight, dest: memoryview | None) -> bytes | None:
        """A READ's data: into `dest` at entry.offset (None returned), or as new bytes."""
        nbytes = entry.nbytes
        if self.persistent:
            buf = entry.staging
            base = entry.start * PAGE_SIZE
            if buf.view is not None:
                source = buf.view[base : base + nbytes]
                if dest is None:
                    return bytes(source)
                dest[entry.offset : entry.offset + nbytes] = source
                return None
            pages = [buf.pages[entry.start + i] for i in range(-(-nbytes // PAGE_SIZE))]
        else:
            pages = [self.allocator.page(seg.gref) for seg in entry.dma_map.segments]
        out = bytearray(nbytes) if dest is None else None
        target = memoryview(out) if out is not None else dest[entry.offset : entry.offset + nbytes]
        for index in range(0, nbytes, PAGE_SIZE):
            size = min(PAGE_SIZE, nbytes - index)
            target[index : index + size] = pages[index // PAGE_SIZE][:size]
        return bytes(out) if out is not None else None

    # -- giving pages back ----------------------------------------------------------------

    def release(self, entry: InFlight) -> bool:
        """Give the request's pages back after its response. False if a grant could not be
        revoked (XSA-396: grant-DMA quarantines the page, it is never reused)."""
        if entry.npages == 0:
            return True
        if self.persistent:
            entry.staging.give(entry.start, entry.npages)
            return True
        dma_map = entry.dma_map
        entry.dma_map = None
        self._request_maps.discard(dma_map)
        try:
            still = dma_map.unload()
        except (GrantDmaError, PlatformError):
            return False
        dma_map.destroy()
        return not still

    def abandon(self, entry: InFlight) -> None:
        """The device failed with `entry` in flight: a load still waiting for refs holds none
        and is cancelled; pages the backend may map are forgotten, never reused (XSA-396)."""
        dma_map = entry.dma_map
        if dma_map is None:
            return
        self._request_maps.discard(dma_map)
        if dma_map.pending:
            dma_map.unload()
            dma_map.destroy()
            entry.dma_map = None

    # -- teardown (registered with the device's Teardown) -------------------------------------

    def _unload_staging(self) -> None:
        try:
            self.still_mapped += self.staging.unload()
        except (GrantDmaError, PlatformError):
            pass  # the maps' pages stay allocated; closing the pool accounts for them

    def _unload_requests(self) -> None:
        loaded, self._request_maps = self._request_maps, set()
        for dma_map in loaded:
            try:
                self.still_mapped += len(dma_map.unload())
            except (GrantDmaError, PlatformError):
                pass  # the pool's close accounts for the page

    def _close_pool(self) -> None:
        self.leaked_pages += self.allocator.close()
