"""Grant-DMA: buffers become grant-referenced segments (a model of FreeBSD's busdma_xen).

Owns: the DMA tag (segment constraints), DMA maps (load / extend / unload, deferred loads),
grant reservations (pools of refs reserved up front, as blkfront and netfront do), the
interface of the grant-ref allocator this layer drives (`GrantAllocator`), the free-callback
queue allocators share (`FreeCallbackQueue`), an in-memory allocator for tests and the
software Xen (`InMemoryGrantAllocator`), and the bytes of blkif indirect segment pages.
Must not: do any I/O, import xentools.platform, or know about rings or xenstore. A "frame"
here is an abstract page number in an address space the caller owns (for the userspace
frontend, a page of its granted buffer pool); this module never touches memory.

Rules followed (misuse raises `GrantDmaError` whose `rule` names the rule):
- A grant covers one 4 KiB frame, so a segment never crosses a page; it also never crosses
  the tag's `boundary`, never exceeds `max_segment_size`, and starts on `alignment`. A buffer
  that needs more than `max_segments` segments or more than `max_size` bytes is refused whole
  ("load.efbig", like bus_dma's EFBIG), never truncated. Nothing is bounced: a userspace
  frontend copies through its granted pages anyway (XSA-403), so misalignment is an error.
- Grant refs are taken all-or-nothing. A load that finds too few refs either fails at once
  with nothing held (NOWAIT -> ENOMEM) or is deferred (WAITOK -> EINPROGRESS) on the
  allocator's free callback, like gnttab_request_free_callback. When woken, the deferred load
  allocates its refs *before* it completes; if another waiter took them first it waits again.
  Its callback therefore never runs without refs (the busdma_xen bug of June 18 in the GSoC
  diary) and runs exactly once, unless `unload()` cancels the load first (then never).
- XSA-396: a ref whose grant the peer still maps cannot be revoked; it is neither freed nor
  reused, and its frame is reported so the caller never reuses the page. Such refs wait in
  the tag's quarantine until `retry_quarantine()` revokes them.

Everything here is single-threaded: an allocator runs free callbacks synchronously from
`free()` on the caller's thread (the frontend's event loop).
"""

from __future__ import annotations

import abc
import enum
import errno
import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from xentools.core.errors import GrantDmaError
from xentools.core import blkif

PAGE_SIZE = blkif.PAGE_SIZE
SECTOR_SIZE = blkif.SECTOR_SIZE  # first_sect/last_sect unit (without feature-large-sector-size)
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE

# Xen keeps grant refs 0..7 for the toolstack (console, xenstore): GNTTAB_NR_RESERVED_ENTRIES.
GNTTAB_NR_RESERVED_ENTRIES = 8
GREF_MAX = 0xFFFFFFFF  # grant_ref_t is uint32_t
DOMID_FIRST_RESERVED = 0x7FF0  # DOMID_SELF and above are not domains one can grant to

SEGMENTS_PER_INDIRECT_PAGE = blkif.SEGS_PER_INDIRECT_FRAME  # 512
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = blkif.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
MAX_INDIRECT_SEGMENTS = SEGMENTS_PER_INDIRECT_PAGE * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST


_error = GrantDmaError


def _check_int(rule: str, name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _error(rule, f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f"..{maximum}"
        raise _error(rule, f"{name}={value} outside {minimum}{upper}")
    return value


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# --------------------------------------------------------------------------------------------
# Enums and messages


class DmaDirection(enum.Enum):
    """Who writes the memory. Decides whether the grant is writable."""

    DEVICE_WRITES = "device-writes"  # BLKIF_OP_READ: the backend writes our pages -> writable grant
    DEVICE_READS = "device-reads"  # BLKIF_OP_WRITE, indirect pages: backend only reads -> read-only

    @property
    def readonly(self) -> bool:
        return self is DmaDirection.DEVICE_READS


class DmaFlags(enum.IntFlag):
    """Load flags, valued as bus_dma(9)'s BUS_DMA_WAITOK (0) and BUS_DMA_NOWAIT (1)."""

    WAITOK = 0
    NOWAIT = 1


class LoadStatus(enum.IntEnum):
    """What load()/extend() did, valued as bus_dmamap_load's return codes."""

    OK = 0  # loaded; the callback already ran
    EINPROGRESS = errno.EINPROGRESS  # deferred until refs are freed; the callback runs then
    ENOMEM = errno.ENOMEM  # NOWAIT and too few refs: nothing held, callback never runs


class MapState(enum.Enum):
    IDLE = "idle"  # created, never loaded
    DEFERRED = "deferred"  # a load or extension waits for refs
    LOADED = "loaded"
    UNLOADED = "unloaded"  # loaded once, now holds nothing; may be loaded again
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class DmaSegment:
    """One granted piece of a buffer: `length` bytes at `offset` inside frame `frame`, which
    the peer reaches through grant ref `gref`. Never crosses its frame."""

    gref: int
    frame: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_int("segment.gref", "gref", self.gref, 0, GREF_MAX)
        _check_int("segment.frame", "frame", self.frame, 0)
        _check_int("segment.offset", "offset", self.offset, 0, PAGE_SIZE - 1)
        _check_int("segment.length", "length", self.length, 1, PAGE_SIZE - self.offset)

    @property
    def address(self) -> int:
        """Byte address of the segment in the caller's page-addressed space."""
        return self.frame * PAGE_SIZE + self.offset

    def _check_sectors(self) -> None:
        # blkif names whole 512-byte sectors, inclusive, inside the frame (blkif.h, "NB.
        # 'first_sect' and 'last_sect'..."): a segment must start and end on a sector edge.
        if self.offset % SECTOR_SIZE or self.length % SECTOR_SIZE:
            raise _error(
                "segment.sector_alignment",
                f"offset {self.offset} / length {self.length} not multiples of {SECTOR_SIZE}",
            )

    @property
    def first_sect(self) -> int:
        """First 512-byte sector of the frame the segment covers (blkif first_sect)."""
        self._check_sectors()
        return self.offset // SECTOR_SIZE

    @property
    def last_sect(self) -> int:
        """Last 512-byte sector covered, inclusive (blkif last_sect, always < 8)."""
        self._check_sectors()
        return (self.offset + self.length) // SECTOR_SIZE - 1


@dataclass(frozen=True)
class LinearBuffer:
    """`length` bytes at byte `address` of the caller's page-addressed space
    (frame = address // PAGE_SIZE), like bus_dmamap_load's (buf, buflen)."""

    address: int
    length: int

    def __post_init__(self) -> None:
        _check_int("buffer.address", "address", self.address, 0)
        _check_int("buffer.length", "length", self.length, 1)

    def _pages(self) -> Iterator[tuple[int, int, int]]:
        address, left = self.address, self.length
        while left:
            offset = address % PAGE_SIZE
            take = min(left, PAGE_SIZE - offset)
            yield address // PAGE_SIZE, offset, take
            address += take
            left -= take


@dataclass(frozen=True)
class PageList:
    """`length` bytes starting `offset` bytes into frames[0] and running on through the
    following frames, which need not be adjacent (like bus_dmamap_load_ma). Exactly the
    frames the bytes touch must be listed."""

    frames: tuple[int, ...]
    offset: int
    length: int

    def __post_init__(self) -> None:
        if isinstance(self.frames, (str, bytes)) or not isinstance(self.frames, Iterable):
            raise _error("buffer.frames", "frames must be a sequence of frame numbers")
        frames = tuple(self.frames)
        object.__setattr__(self, "frames", frames)
        for frame in frames:
            _check_int("buffer.frames", "frame", frame, 0)
        _check_int("buffer.offset", "offset", self.offset, 0, PAGE_SIZE - 1)
        _check_int("buffer.length", "length", self.length, 1)
        needed = -(-(self.offset + self.length) // PAGE_SIZE)
        if len(frames) != needed:
            raise _error(
                "buffer.page_count",
                f"{self.length} bytes at offset {self.offset} touch {needed} frames, "
                f"{len(frames)} given",
            )

    def _pages(self) -> Iterator[tuple[int, int, int]]:
        offset, left = self.offset, self.length
        for frame in self.frames:
            take = min(left, PAGE_SIZE - offset)
            yield frame, offset, take
            left -= take
            offset = 0


DmaBuffer = LinearBuffer | PageList
LoadCallback = Callable[[tuple[DmaSegment, ...]], None]


@dataclass(frozen=True)
class GrantEntry:
    """What a granted ref gives its peer (the fields of a grant table entry)."""

    domid: int
    frame: int
    readonly: bool


# --------------------------------------------------------------------------------------------
# The allocator interface and the free-callback queue


class FreeCallbackRequest:
    """A waiting gnttab_request_free_callback: `callback()` runs once when at least `count`
    refs are free. Cancel it through the allocator that issued it."""

    __slots__ = ("callback", "count", "_waiting")

    def __init__(self, callback: Callable[[], None], count: int) -> None:
        self.callback = callback
        self.count = count
        self._waiting = True

    @property
    def waiting(self) -> bool:
        return self._waiting


class FreeCallbackQueue:
    """The free-callback list an allocator keeps, with Linux's gnttab semantics.

    A request fires once, in FIFO order, when `free_count()` reaches its count; it may fire
    at once if enough refs are already free. A fired callback that allocates leaves fewer
    refs for the next one, which then keeps waiting. Callbacks may allocate, free and request
    again: a nested notify() only marks the queue for another pass, so the outer dispatch
    loop re-checks every waiter until a pass fires nothing.
    """

    def __init__(self, free_count: Callable[[], int]) -> None:
        self._free_count = free_count
        self._waiting: deque[FreeCallbackRequest] = deque()
        self._dispatching = False
        self._recheck = False

    def __len__(self) -> int:
        return len(self._waiting)

    def request(self, callback: Callable[[], None], count: int) -> FreeCallbackRequest:
        if not callable(callback):
            raise _error("free_callback.callback", "callback is not callable")
        _check_int("free_callback.count", "count", count, 1)
        req = FreeCallbackRequest(callback, count)
        self._waiting.append(req)
        # Linux checks at once too: refs freed between a failed alloc and this request
        # must not be missed.
        self.notify()
        return req

    def cancel(self, req: FreeCallbackRequest) -> bool:
        """Withdraw `req`; True if it was still waiting (so it will never fire)."""
        if not req._waiting:
            return False
        req._waiting = False
        self._waiting.remove(req)
        return True

    def notify(self) -> None:
        """Run every waiter whose count is now free. Call after refs were freed."""
        if self._dispatching:
            self._recheck = True
            return
        self._dispatching = True
        try:
            again = True
            while again:
                self._recheck = False
                fired = False
                for req in list(self._waiting):
                    if req._waiting and self._free_count() >= req.count:
                        req._waiting = False
                        self._waiting.remove(req)
                        fired = True
                        req.callback()
                again = fired or self._recheck
        finally:
            self._dispatching = False


class GrantAllocator(abc.ABC):
    """What the grant-DMA layer drives to get grant refs (Linux/FreeBSD gnttab_* calls).

    Implementations: `InMemoryGrantAllocator` here; the platform layer's real and software
    ones. A thin implementation keeps a free list and a `FreeCallbackQueue`, calling
    `queue.notify()` at the end of `free()`.
    """

    @abc.abstractmethod
    def alloc(self, count: int) -> list[int] | None:
        """Take `count` distinct free refs, or None if fewer are free. Never a partial list."""

    @abc.abstractmethod
    def grant(self, ref: int, domid: int, frame: int, readonly: bool) -> None:
        """Let `domid` access `frame` through `ref` (an allocated, not yet granted ref).
        Like gnttab_grant_foreign_access_ref this cannot fail for a valid ref."""

    @abc.abstractmethod
    def end_access(self, ref: int) -> bool:
        """Revoke the grant on `ref`. False if the peer still maps it: the grant stays, and
        neither the ref nor the frame may be reused (XSA-396)."""

    @abc.abstractmethod
    def free(self, refs: Iterable[int]) -> None:
        """Return allocated, not granted refs; then run the free callbacks now satisfied."""

    @abc.abstractmethod
    def request_free_callback(self, callback: Callable[[], None], count: int) -> FreeCallbackRequest:
        """Run `callback()` once when at least `count` refs are free (maybe at once)."""

    @abc.abstractmethod
    def cancel_free_callback(self, request: FreeCallbackRequest) -> bool:
        """Withdraw a request; True if it had not fired yet."""


class InMemoryGrantAllocator(GrantAllocator):
    """A grant table in memory: refs GNTTAB_NR_RESERVED_ENTRIES.. upward, with bookkeeping
    for tests (who holds what, what is granted) and a simulated peer that can map grants
    (`peer_map`), so that end_access can find a ref still mapped.

    Misuse (double free, freeing a granted ref, granting an unallocated ref...) raises
    GrantDmaError with an "allocator.*" rule: it would be a double hand-out or an XSA-396
    reuse on a real grant table.
    """

    def __init__(self, total_refs: int, *, first_ref: int = GNTTAB_NR_RESERVED_ENTRIES) -> None:
        _check_int("allocator.total_refs", "total_refs", total_refs, 1)
        _check_int("allocator.first_ref", "first_ref", first_ref, 0)
        if first_ref + total_refs - 1 > GREF_MAX:
            raise _error("allocator.total_refs", "refs would not fit grant_ref_t (u32)")
        self._total = total_refs
        self._free: deque[int] = deque(range(first_ref, first_ref + total_refs))
        self._allocated: set[int] = set()
        self._grants: dict[int, GrantEntry] = {}
        self._peer_maps: dict[int, int] = {}
        self._callbacks = FreeCallbackQueue(lambda: len(self._free))
        self.handed_out = 0  # refs handed out by alloc() over the allocator's life

    # -- bookkeeping for tests
    @property
    def total_refs(self) -> int:
        return self._total

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def outstanding(self) -> int:
        """Refs allocated and not freed (held by maps, reservations or quarantine)."""
        return len(self._allocated)

    @property
    def allocated(self) -> frozenset[int]:
        return frozenset(self._allocated)

    @property
    def grants(self) -> dict[int, GrantEntry]:
        return dict(self._grants)

    @property
    def waiting_callbacks(self) -> int:
        return len(self._callbacks)

    def grant_entry(self, ref: int) -> GrantEntry | None:
        return self._grants.get(ref)

    # -- the simulated peer
    def peer_map(self, ref: int, writable: bool = False) -> GrantEntry:
        """The peer maps `ref` (as a backend would with gnttab map)."""
        entry = self._grants.get(ref)
        if entry is None:
            raise _error("allocator.peer_not_granted", f"ref {ref} is not granted")
        if writable and entry.readonly:
            raise _error("allocator.peer_readonly", f"ref {ref} is granted read-only")
        self._peer_maps[ref] = self._peer_maps.get(ref, 0) + 1
        return entry

    def peer_unmap(self, ref: int) -> None:
        count = self._peer_maps.get(ref, 0)
        if count == 0:
            raise _error("allocator.peer_not_mapped", f"ref {ref} is not mapped by the peer")
        if count == 1:
            del self._peer_maps[ref]
        else:
            self._peer_maps[ref] = count - 1

    def peer_mapped(self, ref: int) -> bool:
        return ref in self._peer_maps

    # -- GrantAllocator
    def alloc(self, count: int) -> list[int] | None:
        _check_int("allocator.count", "count", count, 0)
        if count > len(self._free):
            return None
        refs = [self._free.popleft() for _ in range(count)]
        for ref in refs:
            if ref in self._allocated:  # the free list itself is corrupt
                raise _error("allocator.double_hand_out", f"ref {ref} handed out twice")
            self._allocated.add(ref)
        self.handed_out += count
        return refs

    def grant(self, ref: int, domid: int, frame: int, readonly: bool) -> None:
        _check_int("allocator.domid", "domid", domid, 0, DOMID_FIRST_RESERVED - 1)
        _check_int("allocator.frame", "frame", frame, 0)
        if ref not in self._allocated:
            raise _error("allocator.grant_unallocated", f"ref {ref} was not allocated")
        if ref in self._grants:
            raise _error("allocator.regrant", f"ref {ref} is already granted")
        self._grants[ref] = GrantEntry(domid, frame, bool(readonly))

    def end_access(self, ref: int) -> bool:
        if ref not in self._grants:
            raise _error("allocator.end_access_ungranted", f"ref {ref} is not granted")
        if ref in self._peer_maps:
            return False
        del self._grants[ref]
        return True

    def free(self, refs: Iterable[int]) -> None:
        refs = list(refs)
        if len(set(refs)) != len(refs):
            raise _error("allocator.double_free", f"ref listed twice in {refs}")
        for ref in refs:
            if ref not in self._allocated:
                raise _error("allocator.double_free", f"ref {ref} is not allocated")
            if ref in self._grants:
                raise _error("allocator.free_granted", f"ref {ref} is still granted (XSA-396)")
        for ref in refs:
            self._allocated.remove(ref)
            self._free.append(ref)
        self._callbacks.notify()

    def request_free_callback(self, callback: Callable[[], None], count: int) -> FreeCallbackRequest:
        return self._callbacks.request(callback, count)

    def cancel_free_callback(self, request: FreeCallbackRequest) -> bool:
        return self._callbacks.cancel(request)


def _alloc_exactly(allocator: GrantAllocator, count: int) -> list[int] | None:
    """allocator.alloc with its all-or-nothing contract checked (platform code is not ours)."""
    refs = allocator.alloc(count)
    if refs is None:
        return None
    refs = list(refs)
    if len(refs) != count or len(set(refs)) != count:
        if len(set(refs)) == len(refs):
            allocator.free(refs)
        raise _error("allocator.partial", f"alloc({count}) returned {len(refs)} refs")
    return refs


# --------------------------------------------------------------------------------------------
# Reservations


class GrantReservation:
    """Refs reserved up front (gnttab_alloc_grant_references): loads draw from the pool
    instead of the allocator and never wait. Refs a map returns go back to the pool while it
    is open (netfront's habit); `release()` gives the unused ones back to the allocator
    (blkfront's habit after building a request). Create with `reserve()`."""

    def __init__(self, allocator: GrantAllocator, refs: Sequence[int]) -> None:
        self._allocator = allocator
        self._refs: list[int] = list(refs)
        self._released = False

    @classmethod
    def reserve(cls, allocator: GrantAllocator, count: int) -> GrantReservation | None:
        """Reserve `count` refs, all or none; None when the allocator has too few free."""
        if not isinstance(allocator, GrantAllocator):
            raise _error("reservation.allocator", "allocator is not a GrantAllocator")
        _check_int("reservation.count", "count", count, 1)
        refs = _alloc_exactly(allocator, count)
        return None if refs is None else cls(allocator, refs)

    @property
    def allocator(self) -> GrantAllocator:
        return self._allocator

    @property
    def available(self) -> int:
        return len(self._refs)

    @property
    def refs(self) -> tuple[int, ...]:
        """The unused refs still in the pool."""
        return tuple(self._refs)

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Return the unused refs to the allocator and close the pool. Idempotent."""
        if self._released:
            return
        refs, self._refs = self._refs, []
        self._released = True
        if refs:
            self._allocator.free(refs)

    def _claim(self, allocator: GrantAllocator, count: int) -> list[int]:
        if self._released:
            raise _error("reservation.released", "the reservation was released")
        if allocator is not self._allocator:
            raise _error("reservation.allocator", "the reservation belongs to another allocator")
        if count > len(self._refs):
            raise _error(
                "reservation.short", f"load needs {count} refs, reservation holds {len(self._refs)}"
            )
        claimed, self._refs = self._refs[:count], self._refs[count:]
        return claimed

    def _put_back(self, ref: int) -> bool:
        if self._released:
            return False
        self._refs.append(ref)
        return True


# --------------------------------------------------------------------------------------------
# Tags and maps


class _Piece(NamedTuple):
    frame: int
    offset: int
    length: int


class DmaTag:
    """Constraints for every map made from it, and the grant domain (bus_dma_tag_create).

    Segments never cross a 4 KiB frame (one grant), never cross a multiple of `boundary`
    (0 = no boundary), are at most `max_segment_size` bytes and start on `alignment`; a load
    has at most `max_segments` segments and `max_size` bytes (default: their product).
    """

    def __init__(
        self,
        allocator: GrantAllocator,
        *,
        domid: int,
        max_segments: int,
        max_segment_size: int = PAGE_SIZE,
        alignment: int = 1,
        boundary: int = 0,
        max_size: int | None = None,
    ) -> None:
        if not isinstance(allocator, GrantAllocator):
            raise _error("tag.allocator", "allocator is not a GrantAllocator")
        _check_int("tag.domid", "domid", domid, 0, DOMID_FIRST_RESERVED - 1)
        _check_int("tag.max_segments", "max_segments", max_segments, 1)
        # A grant covers one frame, so no segment can be longer than a page.
        _check_int("tag.max_segment_size", "max_segment_size", max_segment_size, 1, PAGE_SIZE)
        _check_int("tag.alignment", "alignment", alignment, 1, PAGE_SIZE)
        if not _is_power_of_two(alignment):
            raise _error("tag.alignment", f"alignment={alignment} is not a power of two")
        _check_int("tag.boundary", "boundary", boundary, 0)
        if boundary and not _is_power_of_two(boundary):
            raise _error("tag.boundary", f"boundary={boundary} is not a power of two")
        if boundary and boundary < alignment:
            raise _error("tag.boundary", f"boundary={boundary} < alignment={alignment}")
        # Splits at max_segment_size must land on an aligned address for the next segment.
        if max_segment_size % alignment:
            raise _error(
                "tag.max_segment_size",
                f"max_segment_size={max_segment_size} not a multiple of alignment={alignment}",
            )
        limit = max_segments * max_segment_size
        if max_size is None:
            max_size = limit
        _check_int("tag.max_size", "max_size", max_size, 1, limit)
        self._allocator = allocator
        self._domid = domid
        self._max_segments = max_segments
        self._max_segment_size = max_segment_size
        self._alignment = alignment
        self._boundary = boundary
        self._max_size = max_size
        self._live_maps = 0
        self._destroyed = False
        self._quarantine: list[DmaSegment] = []

    @property
    def allocator(self) -> GrantAllocator:
        return self._allocator

    @property
    def domid(self) -> int:
        return self._domid

    @property
    def max_segments(self) -> int:
        return self._max_segments

    @property
    def max_segment_size(self) -> int:
        return self._max_segment_size

    @property
    def alignment(self) -> int:
        return self._alignment

    @property
    def boundary(self) -> int:
        return self._boundary

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def live_maps(self) -> int:
        return self._live_maps

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    @property
    def quarantined(self) -> tuple[DmaSegment, ...]:
        """Segments whose grant the peer still mapped at unload: ref held, frame not reusable."""
        return tuple(self._quarantine)

    def create_map(self) -> DmaMap:
        return DmaMap(self)

    def destroy(self) -> None:
        """Destroy the tag; refused while maps made from it are alive (the diary's refcount).
        Quarantined refs stay held for good: they could not be revoked (XSA-396)."""
        if self._destroyed:
            raise _error("tag.destroyed", "tag was destroyed already")
        if self._live_maps:
            raise _error("tag.busy", f"{self._live_maps} maps of this tag are not destroyed")
        self._destroyed = True

    def count_segments(self, buffer: DmaBuffer) -> int:
        """How many segments (and refs) loading `buffer` takes; raises as load() would.
        Lets a caller size a GrantReservation."""
        return len(self._plan(buffer, 0, 0))

    def retry_quarantine(self) -> tuple[DmaSegment, ...]:
        """Try again to revoke quarantined grants (as Linux's deferred gnttab free does);
        frees the refs revoked now and returns their segments: those frames may be reused."""
        revoked: list[DmaSegment] = []
        kept: list[DmaSegment] = []
        for seg in self._quarantine:
            (revoked if self._allocator.end_access(seg.gref) else kept).append(seg)
        self._quarantine = kept
        if revoked:
            self._allocator.free(seg.gref for seg in revoked)
        return tuple(revoked)

    def _plan(self, buffer: object, held_segments: int, held_bytes: int) -> tuple[_Piece, ...]:
        if not isinstance(buffer, (LinearBuffer, PageList)):
            raise _error("load.buffer", f"expected LinearBuffer or PageList, got {type(buffer).__name__}")
        if held_bytes + buffer.length > self._max_size:
            raise _error(
                "load.efbig", f"{held_bytes + buffer.length} bytes exceed max_size={self._max_size}"
            )
        pieces: list[_Piece] = []
        for frame, offset, left in buffer._pages():
            while left:
                address = frame * PAGE_SIZE + offset
                if address % self._alignment:
                    raise _error(
                        "load.misaligned",
                        f"segment at {address:#x} not aligned to {self._alignment} (no bouncing)",
                    )
                take = min(left, self._max_segment_size)
                if self._boundary:
                    take = min(take, self._boundary - address % self._boundary)
                pieces.append(_Piece(frame, offset, take))
                if held_segments + len(pieces) > self._max_segments:
                    raise _error(
                        "load.efbig", f"buffer needs more than max_segments={self._max_segments}"
                    )
                offset += take
                left -= take
        quarantined = {seg.frame for seg in self._quarantine}
        for piece in pieces:
            if piece.frame in quarantined:
                raise _error(
                    "load.frame_still_mapped",
                    f"frame {piece.frame} is still mapped by the peer (XSA-396)",
                )
        return tuple(pieces)


@dataclass(eq=False)
class _Pending:
    pieces: tuple[_Piece, ...]
    direction: DmaDirection
    callback: LoadCallback | None
    request: FreeCallbackRequest | None = None


class DmaMap:
    """One buffer's grants (bus_dmamap). Create with `DmaTag.create_map()`.

    idle/unloaded --load--> loaded | deferred;  deferred --refs freed--> loaded;
    loaded --extend--> loaded | deferred;  any --unload--> unloaded;  idle/unloaded --destroy.
    """

    def __init__(self, tag: DmaTag) -> None:
        if not isinstance(tag, DmaTag):
            raise _error("map.tag", "a map is made from a DmaTag")
        if tag.destroyed:
            raise _error("tag.destroyed", "tag was destroyed")
        tag._live_maps += 1  # the tag's refcount: destroy() refuses while maps live
        self._tag = tag
        self._state = MapState.IDLE
        self._direction: DmaDirection | None = None
        # Each held segment with the reservation its ref came from (None: the allocator).
        self._held: list[tuple[DmaSegment, GrantReservation | None]] = []
        self._pending: _Pending | None = None
        self._still_mapped: tuple[DmaSegment, ...] = ()

    @property
    def tag(self) -> DmaTag:
        return self._tag

    @property
    def state(self) -> MapState:
        return self._state

    @property
    def direction(self) -> DmaDirection | None:
        return self._direction

    @property
    def segments(self) -> tuple[DmaSegment, ...]:
        """The granted segments, in buffer order (during a deferred extension: the old ones)."""
        return tuple(seg for seg, _ in self._held)

    @property
    def grefs(self) -> tuple[int, ...]:
        return tuple(seg.gref for seg, _ in self._held)

    @property
    def pending(self) -> bool:
        """A deferred load or extension waits for refs."""
        return self._pending is not None

    @property
    def still_mapped(self) -> tuple[DmaSegment, ...]:
        """What the last unload() could not revoke (also in the tag's quarantine)."""
        return self._still_mapped

    def load(
        self,
        buffer: DmaBuffer,
        direction: DmaDirection,
        callback: LoadCallback | None = None,
        flags: DmaFlags = DmaFlags.WAITOK,
        *,
        reservation: GrantReservation | None = None,
    ) -> LoadStatus:
        """Grant `buffer` to the tag's domain. OK: loaded and `callback(segments)` already
        ran. EINPROGRESS (WAITOK, too few refs): the callback runs once, later, from the
        allocator's free(), with refs granted. ENOMEM (NOWAIT): nothing held, no callback.
        With `reservation`, refs come from it (never deferred). Misuse raises GrantDmaError."""
        self._check_usable()
        if self._state in (MapState.LOADED, MapState.DEFERRED):
            raise _error("map.busy", f"map is {self._state.value}; unload it first")
        if not isinstance(direction, DmaDirection):
            raise _error("load.direction", f"expected DmaDirection, got {direction!r}")
        flags = _check_flags(flags)
        pieces = self._tag._plan(buffer, 0, 0)
        return self._acquire(pieces, direction, callback, flags, reservation)

    def extend(
        self,
        buffer: DmaBuffer,
        callback: LoadCallback | None = None,
        flags: DmaFlags = DmaFlags.WAITOK,
        *,
        reservation: GrantReservation | None = None,
    ) -> LoadStatus:
        """Append `buffer`'s segments to a loaded map, same direction, within the tag's
        max_segments and max_size counted over the whole map. Statuses as load(); the
        callback gets all segments of the map. A deferred extension keeps the map's refs
        while it waits (hold-and-wait, as in bus_dma): extensions deferred on several maps
        that together hold every ref wait forever, so extend with NOWAIT or a reservation
        where that can happen."""
        self._check_usable()
        if self._state is not MapState.LOADED:
            raise _error("map.not_loaded", f"map is {self._state.value}; only a loaded map extends")
        flags = _check_flags(flags)
        held_bytes = sum(seg.length for seg, _ in self._held)
        pieces = self._tag._plan(buffer, len(self._held), held_bytes)
        assert self._direction is not None
        return self._acquire(pieces, self._direction, callback, flags, reservation)

    def unload(self) -> tuple[DmaSegment, ...]:
        """End foreign access and free the refs; cancel a deferred load (its callback will
        never run). Returns the segments the peer still maps: their refs are quarantined in
        the tag and their frames must not be reused (XSA-396). No-op on an idle map."""
        self._check_usable()
        if self._state in (MapState.IDLE, MapState.UNLOADED):
            return ()
        pending, self._pending = self._pending, None
        if pending is not None and pending.request is not None:
            self._tag.allocator.cancel_free_callback(pending.request)
        held, self._held = self._held, []
        self._state = MapState.UNLOADED
        self._direction = None
        allocator = self._tag.allocator
        still: list[DmaSegment] = []
        to_free: list[int] = []
        failure: BaseException | None = None
        for seg, source in held:
            try:
                revoked = allocator.end_access(seg.gref)
            except Exception as exc:  # unknown grant state: never reuse it (XSA-396)
                failure = failure or exc
                revoked = False
            if not revoked:
                still.append(seg)
            elif source is None or not source._put_back(seg.gref):
                to_free.append(seg.gref)
        self._tag._quarantine.extend(still)
        self._still_mapped = tuple(still)
        # State is final before free(): free callbacks run inside it and may use this map.
        if to_free:
            allocator.free(to_free)
        if failure is not None:
            raise failure
        return self._still_mapped

    def destroy(self) -> None:
        """Drop the map (bus_dmamap_destroy); refused while it is loaded or deferred."""
        self._check_usable()
        if self._state in (MapState.LOADED, MapState.DEFERRED):
            raise _error("map.busy", f"map is {self._state.value}; unload it first")
        self._state = MapState.DESTROYED
        self._tag._live_maps -= 1

    # -- internals
    def _check_usable(self) -> None:
        if self._state is MapState.DESTROYED:
            raise _error("map.destroyed", "map was destroyed")

    def _acquire(
        self,
        pieces: tuple[_Piece, ...],
        direction: DmaDirection,
        callback: LoadCallback | None,
        flags: DmaFlags,
        reservation: GrantReservation | None,
    ) -> LoadStatus:
        if callback is not None and not callable(callback):
            raise _error("load.callback", "callback is not callable")
        allocator = self._tag.allocator
        if reservation is not None:
            if not isinstance(reservation, GrantReservation):
                raise _error("load.reservation", "reservation is not a GrantReservation")
            refs = reservation._claim(allocator, len(pieces))
        else:
            found = _alloc_exactly(allocator, len(pieces))
            if found is None:
                if flags & DmaFlags.NOWAIT:
                    return LoadStatus.ENOMEM
                pending = _Pending(pieces, direction, callback)
                if self._state is not MapState.LOADED:
                    self._direction = direction
                self._pending = pending
                self._state = MapState.DEFERRED
                pending.request = allocator.request_free_callback(
                    functools.partial(self._refs_freed, pending), len(pieces)
                )
                return LoadStatus.EINPROGRESS
            refs = found
        self._install(pieces, refs, direction, reservation)
        if callback is not None:
            callback(self.segments)
        return LoadStatus.OK

    def _refs_freed(self, pending: _Pending) -> None:
        if self._pending is not pending:  # cancelled by unload(): no late callback
            return
        allocator = self._tag.allocator
        refs = _alloc_exactly(allocator, len(pending.pieces))
        if refs is None:
            # Woken, but another waiter took the refs first. Completing now would hand the
            # client segments without grants (the June 18 busdma_xen bug): wait again.
            pending.request = allocator.request_free_callback(
                functools.partial(self._refs_freed, pending), len(pending.pieces)
            )
            return
        self._pending = None
        try:
            self._install(pending.pieces, refs, pending.direction, None)
        except BaseException:
            self._state = MapState.LOADED if self._held else MapState.UNLOADED
            if not self._held:
                self._direction = None
            raise
        if pending.callback is not None:
            pending.callback(self.segments)

    def _install(
        self,
        pieces: tuple[_Piece, ...],
        refs: list[int],
        direction: DmaDirection,
        source: GrantReservation | None,
    ) -> None:
        """Grant every piece; on a failure undo the grants done and give the refs back."""
        allocator = self._tag.allocator
        granted: list[int] = []
        try:
            for ref, piece in zip(refs, pieces, strict=True):
                allocator.grant(ref, self._tag.domid, piece.frame, direction.readonly)
                granted.append(ref)
        except BaseException:
            unrevoked = {ref for ref in granted if not allocator.end_access(ref)}
            self._tag._quarantine.extend(
                DmaSegment(ref, piece.frame, piece.offset, piece.length)
                for ref, piece in zip(refs, pieces)
                if ref in unrevoked
            )
            back = [ref for ref in refs if ref not in unrevoked]
            if source is not None:
                back = [ref for ref in back if not source._put_back(ref)]
            if back:
                allocator.free(back)
            raise
        self._held.extend(
            (DmaSegment(ref, piece.frame, piece.offset, piece.length), source)
            for ref, piece in zip(refs, pieces)
        )
        self._direction = direction
        self._state = MapState.LOADED


def _check_flags(flags: object) -> DmaFlags:
    if not isinstance(flags, int) or isinstance(flags, bool) or int(flags) & ~int(DmaFlags.NOWAIT):
        raise _error("load.flags", f"unknown flags {flags!r}")
    return DmaFlags(int(flags))


# --------------------------------------------------------------------------------------------
# blkif indirect segment pages


@dataclass(frozen=True)
class IndirectPages:
    """The contents of blkif indirect pages: `nr_pages` * 4096 bytes, unused entries zero."""

    data: bytes
    nr_pages: int

    @property
    def pages(self) -> tuple[bytes, ...]:
        return tuple(self.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(self.nr_pages))


def indirect_pages_needed(nr_segments: int) -> int:
    """ceil(nr_segments / 512), as blkif.h says for BLKIF_OP_INDIRECT."""
    _check_int("indirect.nr_segments", "nr_segments", nr_segments, 1, MAX_INDIRECT_SEGMENTS)
    return -(-nr_segments // SEGMENTS_PER_INDIRECT_PAGE)


def build_indirect_pages(segments: Sequence[DmaSegment]) -> IndirectPages:
    """Pack `segments` as struct blkif_request_segment entries, 512 per page, through the
    blkif encoder. The pages start zeroed so padding and unused entries carry no stale data
    to the backend (XSA-216 spirit)."""
    segments = tuple(segments)
    indirect_pages_needed(len(segments))
    for index, seg in enumerate(segments):
        if not isinstance(seg, DmaSegment):
            raise _error("indirect.segment", f"entry {index} is not a DmaSegment")
    pages = blkif.encode_indirect_pages(
        tuple(blkif.Segment(s.gref, s.first_sect, s.last_sect) for s in segments))
    return IndirectPages(b"".join(pages), len(pages))
