"""blkfront's grant pool: the pages a userspace frontend shares with its backend.

Owns: `PoolGrantAllocator`, the `GrantAllocator` (xentools.core.grant_dma) over pages this
domain shares through gntshr, within a grant budget; `StagingArea`, the persistent-grant
buffers carved into runs of pages for requests; and the bookkeeping that keeps a page whose
grant the backend may still map from ever being reused (XSA-396).
Must not: know about rings, requests or xenstore, or share memory that holds anything but
I/O data (XSA-403), or hand out a page that still holds an earlier request's bytes: a freed
ref and a returned staging run are zeroed, so a backend that answers a READ without writing
gives zeros, and a short WRITE shows the backend nothing but its own data.

Why a pool at all: a userspace frontend cannot grant its own memory. gntshr (gntalloc) only
shares pages it allocated itself, zeroed (XSA-403: nothing unrelated can leak through them),
and a shared page keeps its grant ref for life. So data is copied through a pool of shared
pages, and "granting" in grant_dma's sense becomes binding a pool page (its ref) to a frame of
the request being built, as busdma binds a bounce page. The grant-DMA layer still decides
how many refs a load takes, all-or-nothing, and defers a load until refs are freed.

Frames: the frames grant_dma sees are nominal page numbers of the requests' own address
space (a request's bytes at a fixed nominal address); the pool page bound to a frame holds
those bytes while the request is in flight. Nothing is ever mapped at a nominal address.

Budget: Linux gntalloc allows 1024 grants per process by default. The allocator never
shares more than `max_pages` pages (the frontend passes its budget minus its ring pages).

Persistent grants: `StagingArea` loads DmaMaps once (staging buffers, each as large as the
largest request, contiguous when it fits one extent) and keeps them loaded; requests take
runs of pages from them, so the backend sees the same refs again and again, and the hot path
touches no grant_dma object. Without persistent grants the
frontend loads a DmaMap per request and unloads it on the response; `end_access` then asks
the platform whether the backend still maps the page (`is_mapped`) and refuses to release it
if so (XSA-396): grant_dma quarantines the ref and the frontend fails the device. Where the
platform cannot tell (real gntalloc), the response itself is taken as the backend's word
that it unmapped the page, as it is all a userspace frontend can have.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from xentools.core.blkif import X86_64, codec_for
from xentools.core.grant_dma import (
    DmaDirection,
    DmaFlags,
    DmaMap,
    DmaTag,
    FreeCallbackQueue,
    FreeCallbackRequest,
    GrantAllocator,
    LinearBuffer,
    LoadStatus,
)
from xentools.core.errors import GrantDmaError
from xentools.platform.interface import PAGE_SIZE, GrantSharer, GrantStillMapped, PlatformError, SharedPages

__all__ = ["PoolGrantAllocator", "StagingArea", "StagingBuffer"]

# struct blkif_request_segment (the same on both ABIs), from the core's one description.
_SEGMENT = codec_for(X86_64).segment
_zero_block = memoryview(bytes(PAGE_SIZE))


def _zeros(nbytes: int) -> memoryview:
    """A read-only view of `nbytes` zero bytes (one shared block, grown on demand)."""
    global _zero_block
    if nbytes > _zero_block.nbytes:
        _zero_block = memoryview(bytes(nbytes))
    return _zero_block[:nbytes]


def _error(rule: str, detail: str) -> GrantDmaError:
    return GrantDmaError(rule, detail)


class PoolGrantAllocator(GrantAllocator):
    """A GrantAllocator whose refs are pages shared with `domid` through `sharer`.

    Pages are shared lazily, `extent_pages` at a time (one `share()` call, contiguous in this
    process), and never more than `max_pages` in all. A ref belongs to its page for life;
    `grant(ref, domid, frame, readonly)` binds the page to a frame of a request. gntshr shares
    pages writable or not when they are shared, and pool pages serve reads and writes alike,
    so every page is shared writable and `readonly` is recorded, not enforced: a backend that
    writes into a WRITE's pages only changes bytes this frontend never reads back.

    `check_mapped`: ask the platform before releasing a ref (non-persistent grants).
    """

    def __init__(
        self,
        sharer: GrantSharer,
        domid: int,
        *,
        max_pages: int,
        extent_pages: int,
        check_mapped: bool,
    ) -> None:
        if max_pages < 1 or extent_pages < 1:
            raise _error("pool.size", f"max_pages={max_pages}, extent_pages={extent_pages}")
        self._sharer = sharer
        self._domid = domid
        self.max_pages = max_pages
        self.extent_pages = extent_pages
        self.check_mapped = check_mapped
        self._extents: list[SharedPages] = []
        self._page_of: dict[int, tuple[int, int]] = {}  # ref -> (extent index, page index)
        self._free: deque[int] = deque()
        self._allocated: set[int] = set()
        self._bound: dict[int, int] = {}  # ref -> frame it carries now
        self._pages = 0
        self._callbacks = FreeCallbackQueue(self._available)
        self.leaked_pages = 0  # pages left shared because the backend still mapped them

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def shared_pages(self) -> int:
        """Pages shared so far (each holds one grant of the budget)."""
        return self._pages

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def outstanding(self) -> int:
        return len(self._allocated)

    def _available(self) -> int:
        growable = (self.max_pages - self._pages) // self.extent_pages * self.extent_pages
        return len(self._free) + growable

    def _grow(self, pages: int) -> bool:
        """Share `pages` more pages (whole extents, the last one may be short)."""
        if self._pages + pages > self.max_pages:
            return False
        while pages > 0:
            count = min(self.extent_pages, pages, self.max_pages - self._pages)
            try:
                shared = self._sharer.share(self._domid, count, writable=True)
            except PlatformError:
                return False  # the platform's own grant limit: callers wait or fail
            index = len(self._extents)
            self._extents.append(shared)
            for page, ref in enumerate(shared.refs):
                self._page_of[ref] = (index, page)
                self._free.append(ref)
            self._pages += count
            pages -= count
        return True

    def page(self, ref: int) -> memoryview:
        """The 4 KiB page behind `ref` (writable view)."""
        extent, page = self._page_of[ref]
        return self._extents[extent].buf[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]

    def run(self, refs: tuple[int, ...]) -> memoryview | None:
        """One contiguous view of the pages of `refs` if they are consecutive pages of one
        extent (in order), else None."""
        first = self._page_of[refs[0]]
        extent, start = first
        for offset, ref in enumerate(refs):
            if self._page_of.get(ref) != (extent, start + offset):
                return None
        return self._extents[extent].buf[start * PAGE_SIZE : (start + len(refs)) * PAGE_SIZE]

    # -- GrantAllocator ---------------------------------------------------------------------

    def alloc(self, count: int) -> list[int] | None:
        if count > len(self._free):
            deficit = count - len(self._free)
            if not self._grow(-(-deficit // self.extent_pages) * self.extent_pages):
                if not self._grow(deficit):
                    return None
        refs = [self._free.popleft() for _ in range(count)]
        self._allocated.update(refs)
        return refs

    def grant(self, ref: int, domid: int, frame: int, readonly: bool) -> None:
        if ref not in self._allocated:
            raise _error("pool.grant_unallocated", f"ref {ref} was not allocated")
        if domid != self._domid:
            raise _error("pool.domid", f"pool pages are shared with domain {self._domid}, not {domid}")
        if ref in self._bound:
            raise _error("pool.regrant", f"ref {ref} already carries frame {self._bound[ref]}")
        self._bound[ref] = frame

    def end_access(self, ref: int) -> bool:
        if ref not in self._bound:
            raise _error("pool.end_access_unbound", f"ref {ref} carries no frame")
        if self.check_mapped:
            extent, _ = self._page_of[ref]
            # XSA-396: a page the backend still maps must not carry another request's bytes.
            if self._sharer.is_mapped(self._extents[extent]) is True:
                return False
        del self._bound[ref]
        return True

    def free(self, refs: Iterable[int]) -> None:
        refs = list(refs)
        for ref in refs:
            if ref not in self._allocated:
                raise _error("pool.double_free", f"ref {ref} is not allocated")
            if ref in self._bound:
                raise _error("pool.free_bound", f"ref {ref} still carries a frame (XSA-396)")
        zero = _zeros(PAGE_SIZE)
        for ref in refs:
            # XSA-403: a free page holds nothing. The next request that takes it may be a
            # READ the backend answers without writing (it must then read zeros, not these
            # bytes), or a short WRITE whose page the backend sees whole.
            self.page(ref)[:] = zero
            self._allocated.remove(ref)
            self._free.append(ref)
        self._callbacks.notify()

    def request_free_callback(self, callback: Callable[[], None], count: int) -> FreeCallbackRequest:
        return self._callbacks.request(callback, count)

    def cancel_free_callback(self, request: FreeCallbackRequest) -> bool:
        return self._callbacks.cancel(request)

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> int:
        """Unshare every extent. An extent the backend still maps stays shared (the sharer
        leaks it on purpose, XSA-396); returns how many pages were leaked that way."""
        leaked = 0
        extents, self._extents = self._extents, []
        for shared in extents:
            try:
                self._sharer.unshare(shared)
            except GrantStillMapped:
                leaked += len(shared.refs)
            except PlatformError:
                leaked += len(shared.refs)
        self._free.clear()
        self._allocated.clear()
        self._bound.clear()
        self._page_of.clear()
        self.leaked_pages += leaked
        return leaked


class StagingBuffer:
    """One persistent DmaMap over a run of pool pages, carved into runs for requests.

    `refs` are the pages' grant refs in order, `view` the pages as one contiguous view (None
    if the allocator could not give consecutive pages), `segments` the blkif segment entries
    of every page as a full page (first_sect 0, last_sect sectors_per_page - 1), so that the
    indirect page of a request is one slice copy.
    """

    __slots__ = ("index", "map", "refs", "view", "pages", "segments", "_free_runs", "free_pages")

    def __init__(self, index: int, dma_map: DmaMap, allocator: PoolGrantAllocator, sectors_per_page: int) -> None:
        self.index = index
        self.map = dma_map
        self.refs = dma_map.grefs
        self.view = allocator.run(self.refs)
        self.pages = [allocator.page(ref) for ref in self.refs]
        last = sectors_per_page - 1
        self.segments = b"".join(_SEGMENT.pack(ref, 0, last) for ref in self.refs)
        self._free_runs: list[list[int]] = [[0, len(self.refs)]]  # [start, length], sorted
        self.free_pages = len(self.refs)

    def take(self, npages: int) -> int:
        """Start of a free run of `npages` pages (first fit), or -1."""
        for run in self._free_runs:
            if run[1] >= npages:
                start = run[0]
                if run[1] == npages:
                    self._free_runs.remove(run)
                else:
                    run[0] += npages
                    run[1] -= npages
                self.free_pages -= npages
                return start
        return -1

    def give(self, start: int, npages: int) -> None:
        """Return a run (its request got its response): its pages are zeroed first, so that a
        free run holds nothing of the request that used it (XSA-403, see PoolGrantAllocator.free)."""
        if self.view is not None:
            self.view[start * PAGE_SIZE : (start + npages) * PAGE_SIZE] = _zeros(npages * PAGE_SIZE)
        else:
            zero = _zeros(PAGE_SIZE)
            for page in self.pages[start : start + npages]:
                page[:] = zero
        runs = self._free_runs
        self.free_pages += npages
        end = start + npages
        for i, run in enumerate(runs):
            if run[0] >= end:
                # Merge with the run after and/or before.
                if run[0] == end:
                    run[0] = start
                    run[1] += npages
                    if i and runs[i - 1][0] + runs[i - 1][1] == start:
                        runs[i - 1][1] += run[1]
                        del runs[i]
                    return
                if i and runs[i - 1][0] + runs[i - 1][1] == start:
                    runs[i - 1][1] += npages
                    return
                runs.insert(i, [start, npages])
                return
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += npages
        else:
            runs.append([start, npages])


class StagingArea:
    """The persistent-grant pool: StagingBuffers loaded on demand, within the budget.

    `take(npages)` returns (buffer, start) of a free run, loading a new buffer (one DmaMap,
    NOWAIT) when none has room and the budget allows; None when the pool is full (the
    request then waits for a response to free pages). Maps stay loaded until `unload()`.
    """

    # Nominal address space of staging buffers (see the module docstring): far above the
    # per-request nominal addresses the non-persistent path uses.
    _BASE_FRAME = 1 << 40

    def __init__(self, allocator: PoolGrantAllocator, domid: int, *, buffer_pages: int, sectors_per_page: int) -> None:
        self.allocator = allocator
        self.buffer_pages = buffer_pages
        self.sectors_per_page = sectors_per_page
        self.tag = DmaTag(allocator, domid=domid, max_segments=buffer_pages)
        self.buffers: list[StagingBuffer] = []
        self._full = False  # the budget is spent: stop trying to load more

    def take(self, npages: int) -> tuple[StagingBuffer, int] | None:
        for buf in self.buffers:
            if buf.free_pages >= npages:
                start = buf.take(npages)
                if start >= 0:
                    return buf, start
        if self._full:
            return None
        buf = self._load(npages)
        if buf is None:
            return None
        return buf, buf.take(npages)

    def _load(self, npages: int) -> StagingBuffer | None:
        left = self.allocator.max_pages - self.allocator.shared_pages + self.allocator.free_count
        size = min(self.buffer_pages, left)
        if size < npages:
            # Too little left for this request; a smaller one may still get a short buffer.
            self._full = size == 0
            return None
        dma_map = self.tag.create_map()
        frame = self._BASE_FRAME + len(self.buffers) * self.buffer_pages
        # Persistent grants serve reads and writes: the backend may write them (writable).
        status = dma_map.load(
            LinearBuffer(frame * PAGE_SIZE, size * PAGE_SIZE), DmaDirection.DEVICE_WRITES, flags=DmaFlags.NOWAIT
        )
        if status is not LoadStatus.OK:
            dma_map.destroy()
            self._full = True
            return None
        buf = StagingBuffer(len(self.buffers), dma_map, self.allocator, self.sectors_per_page)
        self.buffers.append(buf)
        return buf

    @property
    def max_run(self) -> int:
        """The largest run any buffer could ever give."""
        return self.buffer_pages

    def unload(self) -> int:
        """Unload every map (end access, free refs). Returns the pages still mapped by the
        backend (quarantined by grant_dma, never reused)."""
        still = 0
        for buf in self.buffers:
            try:
                still += len(buf.map.unload())
            finally:
                if not buf.map.pending:
                    buf.map.destroy()
        self.buffers = []
        return still
