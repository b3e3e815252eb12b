"""blkfront's request builder: the blkif requests of one connected device.

Owns: `RequestBuilder`, what a request of this device looks like once connected: its handle
(blkif_vdev_t), the disk's sector size, how many data segments a request carries (direct up
to BLKIF_MAX_SEGMENTS_PER_REQUEST, INDIRECT beyond, within the grant budget), how many pages
a chunk of an operation needs, and which flush and discard operations the backend still
offers (a BLKIF_RSP_EOPNOTSUPP turns one off, as in Linux blkfront). It packs requests with
the ring's SlotCodec from pages someone else granted.
Must not: grant, copy or release pages (blkfront_grants), put requests on a ring or choose a
queue (blkfront_rings, blkfront_queue), or talk to xenstore.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from xentools.core.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_WRITE_BARRIER,
    SEGMENT_SIZE,
    SlotCodec,
    indirect_pages_for,
)
from xentools.core.features import Negotiated
from xentools.devices.blkfront_pool import StagingBuffer
from xentools.devices.blkfront_queue import InFlight
from xentools.platform.interface import PAGE_SIZE

__all__ = ["RequestBuilder"]


class RequestBuilder:
    """Requests of one device, as negotiated at Connected.

    `segments_per_request` is what a request really carries: the negotiated indirect
    segments cut to what half the data pages allow (a request never needs more than half
    the pool, so two always fit and a deferred grant load can complete once others finish).
    `stats` is the device's counter dict (direct_requests, indirect_requests).
    """

    def __init__(
        self,
        *,
        handle: int,
        sector_size: int,
        max_indirect_segments: int,
        data_pages: int,
        features: Negotiated,
        stats: dict[str, int],
    ) -> None:
        self.handle = handle
        self.sector_size = sector_size
        self.sectors_per_page = PAGE_SIZE // sector_size
        self.indirect = False
        self.segments_per_request = BLKIF_MAX_SEGMENTS_PER_REQUEST
        if max_indirect_segments:
            cap = data_pages // 2
            segs = min(max_indirect_segments, cap - indirect_pages_for(cap))
            if segs > BLKIF_MAX_SEGMENTS_PER_REQUEST:
                self.indirect = True
                self.segments_per_request = segs
        self.chunk_bytes = self.segments_per_request * PAGE_SIZE  # the most one request moves
        # The most pages one request holds: its data pages and, if INDIRECT, its indirect pages.
        self.max_request_pages = self.segments_per_request + (
            indirect_pages_for(self.segments_per_request) if self.indirect else 0
        )
        self.flush_op: int | None = None
        if features.flush_cache:
            self.flush_op = BLKIF_OP_FLUSH_DISKCACHE
        elif features.barrier:
            self.flush_op = BLKIF_OP_WRITE_BARRIER
        self.discard = features.discard
        self.discard_secure = features.discard_secure
        self._stats = stats

    # -- what the backend still offers ----------------------------------------------------

    def not_supported(self, op: int) -> bool:
        """The backend answered `op` with EOPNOTSUPP: stop sending it (Linux blkfront does
        the same). True if that changed what the device offers."""
        if op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
            self.flush_op = None
            return True
        if op == BLKIF_OP_DISCARD:
            self.discard = self.discard_secure = False
            return True
        return False

    # -- sizes ----------------------------------------------------------------------------

    @staticmethod
    def pages_for(nbytes: int) -> int:
        """Pages a request of `nbytes` holds: its data pages, plus its indirect pages when
        the data pages do not fit a direct request."""
        pages = -(-nbytes // PAGE_SIZE)
        if pages > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            pages += indirect_pages_for(pages)
        return pages

    def last_sect(self, nbytes: int) -> int:
        """last_sect of the final segment of a request of `nbytes` (whole sectors)."""
        ndata = -(-nbytes // PAGE_SIZE)
        return (nbytes - (ndata - 1) * PAGE_SIZE) // self.sector_size - 1

    # -- requests ---------------------------------------------------------------------------

    def bare(self, codec: SlotCodec, entry: InFlight) -> bytes | bytearray:
        """A request without data pages: DISCARD, or a flush or barrier (blkif.h allows 0
        segments for both)."""
        if entry.op == BLKIF_OP_DISCARD:
            return codec.discard_request(self.handle, entry.id, entry.sector, entry.nr_sectors, entry.secure)
        return codec.rw_request(entry.op, self.handle, entry.id, 0, b"", 0)

    def from_run(self, codec: SlotCodec, entry: InFlight, buf: StagingBuffer, start: int) -> bytes | bytearray:
        """The request of `entry` over the run of persistent pages of `buf` from `start`
        (data pages first, then its indirect pages)."""
        nbytes = entry.nbytes
        ndata = -(-nbytes // PAGE_SIZE)
        segs = buf.segments[SEGMENT_SIZE * start : SEGMENT_SIZE * (start + ndata)]
        last = self.last_sect(nbytes)
        if last != self.sectors_per_page - 1:
            segs = bytearray(segs)
            segs[codec.segment_size * (ndata - 1) + codec.last_sect_at] = last
        if ndata <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            self._stats["direct_requests"] += 1
            return codec.rw_request(entry.op, self.handle, entry.id, entry.sector, segs, ndata)
        indirect = [(buf.refs[i], buf.pages[i]) for i in range(start + ndata, start + entry.npages)]
        return self._indirect(codec, entry, segs, ndata, indirect)

    def from_grants(
        self, codec: SlotCodec, entry: InFlight, grefs: Sequence[int], page_of: Callable[[int], memoryview]
    ) -> bytes | bytearray:
        """The request of `entry` over per-request grants `grefs` (data pages first, then
        its indirect pages; `page_of(ref)` is the page of a ref, for the indirect segments)."""
        ndata = -(-entry.nbytes // PAGE_SIZE)
        full = self.sectors_per_page - 1
        last = self.last_sect(entry.nbytes)
        segs = codec.pack_segments(
            [(gref, 0, full if index < ndata - 1 else last) for index, gref in enumerate(grefs[:ndata])]
        )
        if ndata <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            self._stats["direct_requests"] += 1
            return codec.rw_request(entry.op, self.handle, entry.id, entry.sector, segs, ndata)
        return self._indirect(codec, entry, segs, ndata, [(ref, page_of(ref)) for ref in grefs[ndata:]])

    def _indirect(
        self, codec: SlotCodec, entry: InFlight, segs: bytes | bytearray, ndata: int, indirect_pages
    ) -> bytes | bytearray:
        """BLKIF_OP_INDIRECT: the `ndata` packed segments copied into `indirect_pages`
        [(ref, page view)]; the request names the pages."""
        self._stats["indirect_requests"] += 1
        refs = []
        for index, (ref, page) in enumerate(indirect_pages):
            part = segs[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
            page[: len(part)] = part
            refs.append(ref)
        entry.op = BLKIF_OP_INDIRECT
        return codec.indirect_request(entry.rsp_op, self.handle, entry.id, entry.sector, ndata, refs)
