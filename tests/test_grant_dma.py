"""Tests of xentools.core.grant_dma: the busdma_xen edge cases of the GSoC diary, then a
stateful property test over random load/extend/unload/reserve/peer-map sequences."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from xentools.core.errors import GrantDmaError
from xentools.core.grant_dma import (
    GNTTAB_NR_RESERVED_ENTRIES,
    PAGE_SIZE,
    DmaDirection,
    DmaFlags,
    DmaMap,
    DmaSegment,
    DmaTag,
    FreeCallbackQueue,
    GrantReservation,
    InMemoryGrantAllocator,
    LinearBuffer,
    LoadStatus,
    MapState,
    PageList,
    build_indirect_pages,
    indirect_pages_needed,
)

DEV_WRITES = DmaDirection.DEVICE_WRITES
DEV_READS = DmaDirection.DEVICE_READS


def blkif_tag(allocator, max_segments=11, **kw):
    kw.setdefault("alignment", 512)
    return DmaTag(allocator, domid=1, max_segments=max_segments, **kw)


def shape(segments):
    return [(s.frame, s.offset, s.length) for s in segments]


class Recorder:
    """A load callback that remembers each call and what the allocator granted then."""

    def __init__(self, allocator):
        self.allocator = allocator
        self.calls = []

    def __call__(self, segments):
        grants = [self.allocator.grant_entry(s.gref) for s in segments]
        self.calls.append((segments, grants))


def rule_of(excinfo):
    return excinfo.value.rule


# ------------------------------------------------------------------------------------------
# Tag validation


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"max_segments": 0}, "tag.max_segments"),
        ({"max_segments": -3}, "tag.max_segments"),
        ({"max_segments": True}, "tag.max_segments"),
        ({"max_segments": 2, "max_segment_size": 0}, "tag.max_segment_size"),
        ({"max_segments": 2, "max_segment_size": PAGE_SIZE + 1}, "tag.max_segment_size"),
        ({"max_segments": 2, "alignment": 0}, "tag.alignment"),
        ({"max_segments": 2, "alignment": 384}, "tag.alignment"),
        ({"max_segments": 2, "alignment": 2 * PAGE_SIZE}, "tag.alignment"),
        ({"max_segments": 2, "boundary": 3000}, "tag.boundary"),
        ({"max_segments": 2, "boundary": -1}, "tag.boundary"),
        ({"max_segments": 2, "alignment": 1024, "boundary": 512}, "tag.boundary"),
        ({"max_segments": 2, "alignment": 512, "max_segment_size": 1000}, "tag.max_segment_size"),
        ({"max_segments": 2, "max_size": 0}, "tag.max_size"),
        ({"max_segments": 2, "max_size": 2 * PAGE_SIZE + 1}, "tag.max_size"),
        ({"max_segments": 2, "domid": -1}, "tag.domid"),
        ({"max_segments": 2, "domid": 0x7FF0}, "tag.domid"),
    ],
)
def test_tag_rejects_nonsense(kwargs, rule):
    kwargs.setdefault("domid", 1)
    with pytest.raises(GrantDmaError) as excinfo:
        DmaTag(InMemoryGrantAllocator(4), **kwargs)
    assert rule_of(excinfo) == rule
    assert str(excinfo.value).startswith(rule + ":")


def test_tag_needs_an_allocator():
    with pytest.raises(GrantDmaError) as excinfo:
        DmaTag(object(), domid=1, max_segments=1)
    assert rule_of(excinfo) == "tag.allocator"


def test_tag_defaults():
    tag = DmaTag(InMemoryGrantAllocator(4), domid=0, max_segments=11)
    assert (tag.max_segment_size, tag.alignment, tag.boundary) == (PAGE_SIZE, 1, 0)
    assert tag.max_size == 11 * PAGE_SIZE


# ------------------------------------------------------------------------------------------
# Segments respect the tag


def test_linear_buffer_splits_at_pages_and_grants_each_segment():
    alloc = InMemoryGrantAllocator(8)
    tag = blkif_tag(alloc)
    m = tag.create_map()
    rec = Recorder(alloc)
    # 3 KiB + 4 KiB + 1 KiB: starts at offset 1024 of frame 5, ends in frame 7.
    status = m.load(LinearBuffer(5 * PAGE_SIZE + 1024, 8192), DEV_WRITES, rec)
    assert status is LoadStatus.OK
    assert shape(m.segments) == [(5, 1024, 3072), (6, 0, 4096), (7, 0, 1024)]
    assert [(s.first_sect, s.last_sect) for s in m.segments] == [(2, 7), (0, 7), (0, 1)]
    assert m.state is MapState.LOADED and m.direction is DEV_WRITES
    # The callback ran once, synchronously, with refs already granted writable to domid 1.
    assert len(rec.calls) == 1
    segments, grants = rec.calls[0]
    assert segments == m.segments
    assert [(g.domid, g.frame, g.readonly) for g in grants] == [(1, 5, False), (1, 6, False), (1, 7, False)]
    assert len(set(m.grefs)) == 3 and alloc.outstanding == 3
    assert all(g >= GNTTAB_NR_RESERVED_ENTRIES for g in m.grefs)


def test_device_reads_grants_read_only():
    alloc = InMemoryGrantAllocator(4)
    m = blkif_tag(alloc).create_map()
    assert m.load(LinearBuffer(0, 4096), DEV_READS) is LoadStatus.OK
    (seg,) = m.segments
    assert alloc.grant_entry(seg.gref).readonly is True
    with pytest.raises(GrantDmaError) as excinfo:
        alloc.peer_map(seg.gref, writable=True)
    assert rule_of(excinfo) == "allocator.peer_readonly"


def test_page_list_uses_the_listed_frames_in_order():
    alloc = InMemoryGrantAllocator(8)
    m = blkif_tag(alloc).create_map()
    m.load(PageList((40, 3, 17), offset=3584, length=512 + 4096 + 512), DEV_WRITES)
    assert shape(m.segments) == [(40, 3584, 512), (3, 0, 4096), (17, 0, 512)]
    assert [alloc.grant_entry(g).frame for g in m.grefs] == [40, 3, 17]


def test_page_list_must_list_exactly_the_touched_frames():
    with pytest.raises(GrantDmaError) as excinfo:
        PageList((1, 2, 3), offset=0, length=4096)
    assert rule_of(excinfo) == "buffer.page_count"
    with pytest.raises(GrantDmaError) as excinfo:
        PageList((1,), offset=4000, length=200)
    assert rule_of(excinfo) == "buffer.page_count"


def test_max_segment_size_and_boundary_split_inside_a_page():
    alloc = InMemoryGrantAllocator(16)
    tag = DmaTag(alloc, domid=2, max_segments=16, max_segment_size=1536, alignment=512, boundary=2048)
    m = tag.create_map()
    m.load(LinearBuffer(PAGE_SIZE + 512, 7680), DEV_WRITES)
    # Frame 1: 512..2048 (1536, also the boundary), 2048..3584 (max size), 3584..4096 (page).
    # Frame 2: 0..1536, 1536..2048 (boundary), 2048..3584, 3584..4096.
    assert shape(m.segments) == [
        (1, 512, 1536), (1, 2048, 1536), (1, 3584, 512),
        (2, 0, 1536), (2, 1536, 512), (2, 2048, 1536), (2, 3584, 512),
    ]
    for s in m.segments:
        assert s.length <= 1536 and s.address % 512 == 0
        assert s.address // 2048 == (s.address + s.length - 1) // 2048


def test_boundary_larger_than_a_page_is_met_by_page_splits():
    alloc = InMemoryGrantAllocator(8)
    tag = DmaTag(alloc, domid=1, max_segments=8, boundary=1 << 16)
    m = tag.create_map()
    m.load(LinearBuffer(15 * PAGE_SIZE + 2048, 4096), DEV_WRITES)
    assert shape(m.segments) == [(15, 2048, 2048), (16, 0, 2048)]


def test_misaligned_buffer_is_refused_not_bounced():
    alloc = InMemoryGrantAllocator(4)
    m = blkif_tag(alloc).create_map()
    with pytest.raises(GrantDmaError) as excinfo:
        m.load(LinearBuffer(100, 512), DEV_WRITES)
    assert rule_of(excinfo) == "load.misaligned"
    assert m.state is MapState.IDLE and alloc.outstanding == 0


def test_too_many_segments_is_efbig_not_truncated():
    alloc = InMemoryGrantAllocator(16)
    tag = blkif_tag(alloc, max_segments=2)
    m = tag.create_map()
    rec = Recorder(alloc)
    # 2 pages but starting mid-page: needs 3 segments.
    with pytest.raises(GrantDmaError) as excinfo:
        m.load(LinearBuffer(512, 2 * PAGE_SIZE), DEV_WRITES, rec)
    assert rule_of(excinfo) == "load.efbig"
    assert m.state is MapState.IDLE and m.segments == () and rec.calls == []
    assert alloc.outstanding == 0 and alloc.handed_out == 0
    assert tag.count_segments(LinearBuffer(0, 2 * PAGE_SIZE)) == 2


def test_max_size_is_efbig():
    alloc = InMemoryGrantAllocator(16)
    m = blkif_tag(alloc, max_segments=4, max_size=6144).create_map()
    with pytest.raises(GrantDmaError) as excinfo:
        m.load(LinearBuffer(0, 6656), DEV_WRITES)
    assert rule_of(excinfo) == "load.efbig"
    assert m.load(LinearBuffer(0, 6144), DEV_WRITES) is LoadStatus.OK


def test_sector_helpers_refuse_partial_sectors():
    seg = DmaSegment(gref=9, frame=1, offset=100, length=512)
    with pytest.raises(GrantDmaError) as excinfo:
        seg.first_sect
    assert rule_of(excinfo) == "segment.sector_alignment"
    with pytest.raises(GrantDmaError) as excinfo:
        DmaSegment(gref=9, frame=1, offset=3584, length=1024)
    assert rule_of(excinfo) == "segment.length"


def test_load_validates_its_arguments():
    alloc = InMemoryGrantAllocator(4)
    m = blkif_tag(alloc).create_map()
    cases = [
        ((b"abc", DEV_WRITES), {}, "load.buffer"),
        ((LinearBuffer(0, 512), "read"), {}, "load.direction"),
        ((LinearBuffer(0, 512), DEV_WRITES), {"flags": 4}, "load.flags"),
        ((LinearBuffer(0, 512), DEV_WRITES, 42), {}, "load.callback"),
    ]
    for args, kwargs, rule in cases:
        with pytest.raises(GrantDmaError) as excinfo:
            m.load(*args, **kwargs)
        assert rule_of(excinfo) == rule
    assert alloc.outstanding == 0 and m.state is MapState.IDLE
    with pytest.raises(GrantDmaError) as excinfo:
        LinearBuffer(0, 0)
    assert rule_of(excinfo) == "buffer.length"


# ------------------------------------------------------------------------------------------
# Map states, tag refcount


def test_load_on_a_busy_map_and_extend_on_an_idle_map_are_refused():
    alloc = InMemoryGrantAllocator(4)
    m = blkif_tag(alloc).create_map()
    with pytest.raises(GrantDmaError) as excinfo:
        m.extend(LinearBuffer(0, 512))
    assert rule_of(excinfo) == "map.not_loaded"
    m.load(LinearBuffer(0, 512), DEV_WRITES)
    with pytest.raises(GrantDmaError) as excinfo:
        m.load(LinearBuffer(0, 512), DEV_WRITES)
    assert rule_of(excinfo) == "map.busy"
    assert m.unload() == ()
    assert m.state is MapState.UNLOADED and m.segments == () and m.direction is None
    assert m.unload() == ()  # unloading twice is harmless, as in bus_dma
    assert m.load(LinearBuffer(0, 512), DEV_READS) is LoadStatus.OK


def test_tag_destroy_refuses_live_maps():
    alloc = InMemoryGrantAllocator(4)
    tag = blkif_tag(alloc)
    a, b = tag.create_map(), DmaMap(tag)
    assert tag.live_maps == 2
    a.load(LinearBuffer(0, 512), DEV_WRITES)
    with pytest.raises(GrantDmaError) as excinfo:
        a.destroy()
    assert rule_of(excinfo) == "map.busy"
    a.unload()
    a.destroy()
    with pytest.raises(GrantDmaError) as excinfo:
        tag.destroy()
    assert rule_of(excinfo) == "tag.busy"
    b.destroy()
    tag.destroy()
    assert tag.destroyed
    for call in (tag.create_map, tag.destroy):
        with pytest.raises(GrantDmaError) as excinfo:
            call()
        assert rule_of(excinfo) == "tag.destroyed"
    with pytest.raises(GrantDmaError) as excinfo:
        a.load(LinearBuffer(0, 512), DEV_WRITES)
    assert rule_of(excinfo) == "map.destroyed"


# ------------------------------------------------------------------------------------------
# Free callbacks and deferred loads


def test_free_callback_fires_once_when_count_is_free():
    alloc = InMemoryGrantAllocator(4)
    held = alloc.alloc(4)
    fired = []
    alloc.request_free_callback(lambda: fired.append(alloc.free_count), 2)
    alloc.free(held[:1])
    assert fired == []
    alloc.free(held[1:2])
    assert fired == [2]
    alloc.free(held[2:])
    assert fired == [2]  # once only
    assert alloc.waiting_callbacks == 0


def test_free_callback_fires_at_once_when_refs_are_already_free_and_can_be_cancelled():
    alloc = InMemoryGrantAllocator(2)
    fired = []
    req = alloc.request_free_callback(lambda: fired.append("now"), 2)
    assert fired == ["now"] and not req.waiting
    held = alloc.alloc(2)
    req = alloc.request_free_callback(lambda: fired.append("late"), 1)
    assert alloc.cancel_free_callback(req) is True
    assert alloc.cancel_free_callback(req) is False
    alloc.free(held)
    assert fired == ["now"]


def test_free_callbacks_are_reentrant():
    """A callback that frees refs wakes later waiters in the same free() call."""
    alloc = InMemoryGrantAllocator(3)
    held = alloc.alloc(3)
    order = []

    def first():
        order.append("first")
        alloc.free(held[1:])  # frees 2 more while the queue is dispatching

    alloc.request_free_callback(first, 1)
    alloc.request_free_callback(lambda: order.append("second"), 3)
    alloc.free(held[:1])
    assert order == ["first", "second"]


def test_free_callback_queue_keeps_waiting_when_an_earlier_callback_takes_the_refs():
    free = [0]
    queue = FreeCallbackQueue(lambda: free[0])
    order = []

    def greedy():
        order.append("greedy")
        free[0] -= 2

    queue.request(greedy, 2)
    queue.request(lambda: order.append("late"), 2)
    free[0] = 2
    queue.notify()
    assert order == ["greedy"] and len(queue) == 1
    free[0] = 2
    queue.notify()
    assert order == ["greedy", "late"] and len(queue) == 0
    with pytest.raises(GrantDmaError) as excinfo:
        queue.request(lambda: None, 0)
    assert rule_of(excinfo) == "free_callback.count"


def test_deferred_load_completes_with_refs_allocated():
    """The June 18 bug: the deferred callback ran with no grant refs allocated."""
    alloc = InMemoryGrantAllocator(3)
    tag = blkif_tag(alloc)
    hog, m = tag.create_map(), tag.create_map()
    hog.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES)
    rec = Recorder(alloc)
    status = m.load(LinearBuffer(10 * PAGE_SIZE, 2 * PAGE_SIZE), DEV_READS, rec)
    assert status is LoadStatus.EINPROGRESS
    assert m.state is MapState.DEFERRED and m.pending and m.segments == () and rec.calls == []
    assert alloc.outstanding == 2 and alloc.waiting_callbacks == 1  # the deferred load holds nothing
    hog.unload()
    assert len(rec.calls) == 1
    segments, grants = rec.calls[0]
    assert m.state is MapState.LOADED and not m.pending and segments == m.segments
    assert shape(segments) == [(10, 0, 4096), (11, 0, 4096)]
    # Every ref the callback saw was allocated and granted before the callback ran.
    assert all(g is not None for g in grants)
    assert [(g.frame, g.readonly) for g in grants] == [(10, True), (11, True)]
    assert set(m.grefs) <= alloc.allocated and alloc.outstanding == 2
    assert alloc.waiting_callbacks == 0
    hog.load(LinearBuffer(0, 512), DEV_WRITES)
    assert len(rec.calls) == 1  # exactly once


def test_woken_deferred_load_that_loses_the_race_waits_again():
    alloc = InMemoryGrantAllocator(2)
    tag = blkif_tag(alloc)
    hog, a, b = tag.create_map(), tag.create_map(), tag.create_map()
    hog.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES)
    rec_a, rec_b = Recorder(alloc), Recorder(alloc)
    assert a.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES, rec_a) is LoadStatus.EINPROGRESS
    assert b.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES, rec_b) is LoadStatus.EINPROGRESS
    hog.unload()
    # Both were waiting for 2 refs; a got them, b was woken or checked, found none, waits on.
    assert len(rec_a.calls) == 1 and rec_b.calls == []
    assert b.state is MapState.DEFERRED and alloc.waiting_callbacks == 1
    a.unload()
    assert len(rec_b.calls) == 1 and b.state is MapState.LOADED
    assert all(g is not None for g in rec_b.calls[0][1])


def test_refs_taken_by_a_plain_alloc_before_the_callback_make_the_load_wait_again():
    """A free callback only promises that refs *were* free: the load must re-check."""
    alloc = InMemoryGrantAllocator(2)
    tag = blkif_tag(alloc)
    hog, m = tag.create_map(), tag.create_map()
    hog.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES)
    rec = Recorder(alloc)
    m.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES, rec)
    stolen = []
    late_thief = alloc.request_free_callback(lambda: stolen.extend(alloc.alloc(2) or []), 2)
    hog.unload()
    # m waited first (FIFO) and took both refs; the later waiter keeps waiting.
    assert len(rec.calls) == 1 and stolen == [] and late_thief.waiting
    assert alloc.cancel_free_callback(late_thief)
    # Now the other way round: a thief ahead of a waiting map.
    m.unload()
    hog.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES)
    thief_req = alloc.request_free_callback(lambda: stolen.extend(alloc.alloc(2) or []), 2)
    m.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES, rec)
    hog.unload()
    assert len(stolen) == 2 and not thief_req.waiting
    assert len(rec.calls) == 1 and m.state is MapState.DEFERRED  # no callback without refs
    alloc.free(stolen)
    assert len(rec.calls) == 2 and all(g is not None for g in rec.calls[1][1])


def test_nowait_fails_at_once_with_nothing_held():
    alloc = InMemoryGrantAllocator(3)
    tag = blkif_tag(alloc)
    hog, m = tag.create_map(), tag.create_map()
    hog.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES)
    rec = Recorder(alloc)
    status = m.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES, rec, DmaFlags.NOWAIT)
    assert status is LoadStatus.ENOMEM
    assert m.state is MapState.IDLE and m.segments == () and not m.pending
    assert alloc.outstanding == 2 and alloc.waiting_callbacks == 0
    hog.unload()
    assert rec.calls == []  # and never later
    assert m.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES, rec, DmaFlags.NOWAIT) is LoadStatus.OK


def test_unload_before_deferred_load_completes_cancels_it():
    alloc = InMemoryGrantAllocator(2)
    tag = blkif_tag(alloc)
    hog, m = tag.create_map(), tag.create_map()
    hog.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES)
    rec = Recorder(alloc)
    assert m.load(LinearBuffer(0, PAGE_SIZE), DEV_WRITES, rec) is LoadStatus.EINPROGRESS
    assert m.unload() == ()
    assert m.state is MapState.UNLOADED and not m.pending
    assert alloc.waiting_callbacks == 0
    hog.unload()
    assert rec.calls == []  # no late callback
    assert alloc.outstanding == 0 and alloc.free_count == 2  # no leak
    m.destroy()
    hog.destroy()
    tag.destroy()


def test_stale_free_callback_after_unload_does_nothing():
    """If the allocator's cancel comes too late (the callback was already on its way, as on
    a platform that runs callbacks from elsewhere), the map ignores the stale wake-up."""

    class LateCancel(InMemoryGrantAllocator):
        def cancel_free_callback(self, request):
            return False  # too late: it will still fire

    alloc = LateCancel(1)
    tag = blkif_tag(alloc)
    hog, m = tag.create_map(), tag.create_map()
    hog.load(LinearBuffer(0, 512), DEV_WRITES)
    rec = Recorder(alloc)
    assert m.load(LinearBuffer(0, 512), DEV_WRITES, rec) is LoadStatus.EINPROGRESS
    m.unload()
    hog.unload()  # fires the stale callback
    assert rec.calls == [] and m.state is MapState.UNLOADED
    assert alloc.outstanding == 0 and alloc.waiting_callbacks == 0


def test_deferred_callback_may_unload_its_own_map_and_wake_the_next():
    alloc = InMemoryGrantAllocator(1)
    tag = blkif_tag(alloc)
    hog, a, b = tag.create_map(), tag.create_map(), tag.create_map()
    hog.load(LinearBuffer(0, 512), DEV_WRITES)
    seen = []

    def done_a(segments):
        seen.append(("a", segments[0].gref))
        a.unload()  # e.g. an I/O that finished at once

    a.load(LinearBuffer(0, 512), DEV_WRITES, done_a)
    b.load(LinearBuffer(0, 512), DEV_WRITES, lambda segs: seen.append(("b", segs[0].gref)))
    hog.unload()
    assert [who for who, _ in seen] == ["a", "b"]
    assert b.state is MapState.LOADED and a.state is MapState.UNLOADED
    assert alloc.outstanding == 1


def test_grant_failure_rolls_back():
    class Flaky(InMemoryGrantAllocator):
        calls = 0

        def grant(self, ref, domid, frame, readonly):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise RuntimeError("hypercall failed")
            super().grant(ref, domid, frame, readonly)

    alloc = Flaky(4)
    m = blkif_tag(alloc).create_map()
    with pytest.raises(RuntimeError):
        m.load(LinearBuffer(0, 3 * PAGE_SIZE), DEV_WRITES)
    assert alloc.outstanding == 0 and alloc.grants == {}
    assert m.state is MapState.IDLE


# ------------------------------------------------------------------------------------------
# XSA-396: refs still mapped by the peer


def test_still_mapped_ref_is_not_freed_or_reused_and_frame_is_reported():
    alloc = InMemoryGrantAllocator(2)
    tag = blkif_tag(alloc)
    m, other = tag.create_map(), tag.create_map()
    m.load(LinearBuffer(3 * PAGE_SIZE, 2 * PAGE_SIZE), DEV_WRITES)
    stuck = m.segments[1]
    alloc.peer_map(stuck.gref, writable=True)
    still = m.unload()
    assert still == (stuck,) and m.still_mapped == (stuck,) and tag.quarantined == (stuck,)
    assert m.state is MapState.UNLOADED
    # The ref stays allocated and granted: no one else can get it.
    assert alloc.outstanding == 1 and alloc.grant_entry(stuck.gref).frame == 4
    other.load(LinearBuffer(0, PAGE_SIZE), DEV_WRITES)
    assert stuck.gref not in other.grefs
    assert alloc.free_count == 0
    other.unload()
    # The page must not be reused either.
    with pytest.raises(GrantDmaError) as excinfo:
        other.load(LinearBuffer(4 * PAGE_SIZE + 512, 512), DEV_READS)
    assert rule_of(excinfo) == "load.frame_still_mapped"
    assert tag.retry_quarantine() == ()
    alloc.peer_unmap(stuck.gref)
    assert tag.retry_quarantine() == (stuck,)
    assert tag.quarantined == () and alloc.outstanding == 0 and alloc.grants == {}
    assert other.load(LinearBuffer(4 * PAGE_SIZE, 512), DEV_READS) is LoadStatus.OK


def test_allocator_refuses_xsa_396_reuse_and_double_free():
    alloc = InMemoryGrantAllocator(2)
    (ref,) = alloc.alloc(1)
    alloc.grant(ref, 1, 7, readonly=False)
    cases = [
        (lambda: alloc.free([ref]), "allocator.free_granted"),
        (lambda: alloc.grant(ref, 1, 7, readonly=False), "allocator.regrant"),
        (lambda: alloc.grant(ref + 1, 1, 7, readonly=False), "allocator.grant_unallocated"),
        (lambda: alloc.end_access(ref + 1), "allocator.end_access_ungranted"),
        (lambda: alloc.free([ref + 1]), "allocator.double_free"),
    ]
    for call, rule in cases:
        with pytest.raises(GrantDmaError) as excinfo:
            call()
        assert rule_of(excinfo) == rule
    alloc.peer_map(ref)
    assert alloc.end_access(ref) is False and alloc.grant_entry(ref) is not None
    alloc.peer_unmap(ref)
    assert alloc.end_access(ref) is True
    alloc.free([ref])
    with pytest.raises(GrantDmaError) as excinfo:
        alloc.free([ref])
    assert rule_of(excinfo) == "allocator.double_free"
    assert alloc.alloc(3) is None and alloc.outstanding == 0  # all or nothing


# ------------------------------------------------------------------------------------------
# Reservations


def test_reservation_feeds_loads_and_returns_unused_refs():
    alloc = InMemoryGrantAllocator(6)
    tag = blkif_tag(alloc)
    m = tag.create_map()
    pool = GrantReservation.reserve(alloc, 4)
    assert pool is not None and pool.available == 4 and alloc.outstanding == 4
    reserved = set(pool.refs)
    handed = alloc.handed_out
    buf = LinearBuffer(0, 3 * PAGE_SIZE)
    assert m.load(buf, DEV_WRITES, flags=DmaFlags.NOWAIT, reservation=pool) is LoadStatus.OK
    assert set(m.grefs) <= reserved and alloc.handed_out == handed  # drawn from the pool
    assert pool.available == 1
    # netfront habit: refs come back to the open pool.
    m.unload()
    assert pool.available == 4 and alloc.outstanding == 4
    # A pool that is too small is the caller's sizing mistake, not a reason to wait.
    m2 = tag.create_map()
    m.load(buf, DEV_WRITES, reservation=pool)
    with pytest.raises(GrantDmaError) as excinfo:
        m2.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES, reservation=pool)
    assert rule_of(excinfo) == "reservation.short"
    assert m2.state is MapState.IDLE and pool.available == 1
    # blkfront habit: release the rest after building the request; the map's refs go to
    # the allocator when it unloads.
    pool.release()
    assert pool.released and pool.available == 0 and alloc.outstanding == 3
    pool.release()
    m.unload()
    assert alloc.outstanding == 0
    with pytest.raises(GrantDmaError) as excinfo:
        m.load(buf, DEV_WRITES, reservation=pool)
    assert rule_of(excinfo) == "reservation.released"


def test_reservation_is_all_or_nothing_and_bound_to_its_allocator():
    alloc = InMemoryGrantAllocator(3)
    assert GrantReservation.reserve(alloc, 4) is None and alloc.outstanding == 0
    pool = GrantReservation.reserve(InMemoryGrantAllocator(3), 2)
    m = blkif_tag(alloc).create_map()
    with pytest.raises(GrantDmaError) as excinfo:
        m.load(LinearBuffer(0, 512), DEV_WRITES, reservation=pool)
    assert rule_of(excinfo) == "reservation.allocator"
    with pytest.raises(GrantDmaError) as excinfo:
        GrantReservation.reserve(alloc, 0)
    assert rule_of(excinfo) == "reservation.count"


def test_releasing_a_reservation_wakes_deferred_loads():
    alloc = InMemoryGrantAllocator(2)
    m = blkif_tag(alloc).create_map()
    pool = GrantReservation.reserve(alloc, 2)
    rec = Recorder(alloc)
    assert m.load(LinearBuffer(0, 512), DEV_WRITES, rec) is LoadStatus.EINPROGRESS
    pool.release()
    assert len(rec.calls) == 1 and m.state is MapState.LOADED


# ------------------------------------------------------------------------------------------
# Extend


def test_extend_appends_within_tag_limits():
    alloc = InMemoryGrantAllocator(8)
    tag = blkif_tag(alloc, max_segments=3, max_size=2 * PAGE_SIZE)
    m = tag.create_map()
    m.load(LinearBuffer(0, PAGE_SIZE), DEV_READS)
    rec = Recorder(alloc)
    assert m.extend(PageList((9,), 0, 2048), rec) is LoadStatus.OK
    assert shape(m.segments) == [(0, 0, 4096), (9, 0, 2048)]
    assert rec.calls[0][0] == m.segments
    assert alloc.grant_entry(m.grefs[1]).readonly is True  # same direction as the load
    before = m.segments
    with pytest.raises(GrantDmaError) as excinfo:  # a 4th segment
        m.extend(LinearBuffer(20 * PAGE_SIZE, PAGE_SIZE + 512))
    assert rule_of(excinfo) == "load.efbig"
    with pytest.raises(GrantDmaError) as excinfo:  # over max_size counted on the whole map
        m.extend(LinearBuffer(20 * PAGE_SIZE, 2560))
    assert rule_of(excinfo) == "load.efbig"
    assert m.segments == before and alloc.outstanding == 2
    assert m.extend(LinearBuffer(20 * PAGE_SIZE, 2048)) is LoadStatus.OK
    assert len(m.segments) == 3
    m.unload()
    assert alloc.outstanding == 0


def test_deferred_extend_completes_or_is_cancelled():
    alloc = InMemoryGrantAllocator(3)
    tag = blkif_tag(alloc)
    m, hog = tag.create_map(), tag.create_map()
    m.load(LinearBuffer(0, PAGE_SIZE), DEV_WRITES)
    hog.load(LinearBuffer(0, 2 * PAGE_SIZE), DEV_WRITES)
    assert m.extend(LinearBuffer(8 * PAGE_SIZE, 512), flags=DmaFlags.NOWAIT) is LoadStatus.ENOMEM
    assert m.state is MapState.LOADED and len(m.segments) == 1
    rec = Recorder(alloc)
    assert m.extend(LinearBuffer(8 * PAGE_SIZE, 512), rec) is LoadStatus.EINPROGRESS
    assert m.state is MapState.DEFERRED and len(m.segments) == 1
    hog.unload()
    assert len(rec.calls) == 1
    assert shape(rec.calls[0][0]) == [(0, 0, 4096), (8, 0, 512)]
    assert m.state is MapState.LOADED
    # Cancel a pending extension: everything is released, no late callback.
    hog.load(LinearBuffer(0, 512), DEV_WRITES)
    rec2 = Recorder(alloc)
    assert m.extend(LinearBuffer(9 * PAGE_SIZE, 512), rec2) is LoadStatus.EINPROGRESS
    m.unload()
    hog.unload()
    assert rec2.calls == [] and alloc.outstanding == 0 and alloc.waiting_callbacks == 0


# ------------------------------------------------------------------------------------------
# Indirect pages


def test_indirect_pages_layout():
    alloc = InMemoryGrantAllocator(600)
    tag = blkif_tag(alloc, max_segments=600)
    m = tag.create_map()
    # 513 segments: 512 full frames, then sectors 2..4 of one more frame.
    m.load(PageList(tuple(range(512)), 0, 512 * PAGE_SIZE), DEV_WRITES)
    m.extend(LinearBuffer(1000 * PAGE_SIZE + 1024, 1536))
    pages = build_indirect_pages(m.segments)
    assert pages.nr_pages == 2 == indirect_pages_needed(513)
    assert len(pages.data) == 2 * PAGE_SIZE and len(pages.pages) == 2
    for index, seg in enumerate(m.segments):
        gref, first, last, pad = struct.unpack_from("<IBBH", pages.data, index * 8)
        assert (gref, first, last, pad) == (seg.gref, seg.first_sect, seg.last_sect, 0)
    assert pages.pages[1][:8] == struct.pack("<IBBH", m.grefs[512], 2, 4, 0)
    assert pages.pages[1][8:] == bytes(PAGE_SIZE - 8)  # unused entries stay zero


def test_indirect_pages_limits():
    seg = DmaSegment(gref=8, frame=0, offset=0, length=4096)
    assert build_indirect_pages([seg] * 4096).nr_pages == 8
    assert build_indirect_pages([seg]).data[:8] == bytes([8, 0, 0, 0, 0, 7, 0, 0])
    for segments, rule in [
        ([], "indirect.nr_segments"),
        ([seg] * 4097, "indirect.nr_segments"),
        ([DmaSegment(gref=8, frame=0, offset=0, length=100)], "segment.sector_alignment"),
        ([(8, 0, 7)], "indirect.segment"),
    ]:
        with pytest.raises(GrantDmaError) as excinfo:
            build_indirect_pages(segments)
        assert rule_of(excinfo) == rule


def test_indirect_pages_themselves_go_through_a_map():
    """As in the diary's blkfront conversion: indirect pages are granted read-only."""
    alloc = InMemoryGrantAllocator(16)
    data_tag = blkif_tag(alloc, max_segments=12)
    ind_tag = DmaTag(alloc, domid=1, max_segments=8, alignment=PAGE_SIZE)
    data, ind = data_tag.create_map(), ind_tag.create_map()
    data.load(LinearBuffer(0, 12 * PAGE_SIZE), DEV_WRITES)
    pages = build_indirect_pages(data.segments)
    assert ind.load(LinearBuffer(100 * PAGE_SIZE, len(pages.data)), DEV_READS) is LoadStatus.OK
    assert len(ind.grefs) == pages.nr_pages == 1
    assert alloc.grant_entry(ind.grefs[0]).readonly is True


# ------------------------------------------------------------------------------------------
# Stateful property test

UNIT = 256  # every address and length below is a multiple: the oracle walks in these units


def oracle(tag, buffer, held_segments, held_bytes):
    """Expected (frame, offset, length) pieces, or the rule a load must fail with, found by
    walking the buffer 256 bytes at a time (independent of the module's arithmetic)."""
    if held_bytes + buffer.length > tag.max_size:
        return "load.efbig"
    if isinstance(buffer, LinearBuffer):
        units = [(a // PAGE_SIZE, a % PAGE_SIZE) for a in range(buffer.address, buffer.address + buffer.length, UNIT)]
    else:
        units = [
            (buffer.frames[i // PAGE_SIZE], i % PAGE_SIZE)
            for i in range(buffer.offset, buffer.offset + buffer.length, UNIT)
        ]
    pieces = []
    for frame, off in units:
        address = frame * PAGE_SIZE + off
        new = (
            not pieces
            or off == 0
            or pieces[-1][2] == tag.max_segment_size
            or (tag.boundary and address % tag.boundary == 0)
        )
        if new:
            pieces.append([frame, off, UNIT])
        else:
            pieces[-1][2] += UNIT
    first = pieces[0]
    if (first[0] * PAGE_SIZE + first[1]) % tag.alignment:
        return "load.misaligned"
    if held_segments + len(pieces) > tag.max_segments:
        return "load.efbig"
    if {p[0] for p in pieces} & {s.frame for s in tag.quarantined}:
        return "load.frame_still_mapped"
    return [tuple(p) for p in pieces]


@st.composite
def buffers(draw):
    length = UNIT * draw(st.integers(1, 16) | st.integers(1, 40))
    # Mostly sector-aligned starts; a few 256-byte ones trip tags aligned to 512.
    offset = draw(st.integers(0, 7).map(lambda k: 512 * k) | st.integers(0, 15).map(lambda k: UNIT * k))
    if draw(st.booleans()):
        return LinearBuffer(draw(st.integers(0, 5)) * PAGE_SIZE + offset, length)
    count = -(-(offset + length) // PAGE_SIZE)
    frames = draw(st.lists(st.integers(0, 5), min_size=count, max_size=count))
    return PageList(tuple(frames), offset, length)


@st.composite
def tag_params(draw):
    alignment = draw(st.sampled_from([UNIT, 512]))
    return {
        "alignment": alignment,
        "max_segment_size": draw(st.sampled_from([s for s in (512, 1024, 1536, 2048, 4096) if s % alignment == 0])),
        "boundary": draw(st.sampled_from([0, 1024, 2048, 8192])),
        "max_segments": draw(st.integers(1, 5)),
    }


TOTAL_REFS = 6
N_MAPS = 4


class GrantDmaMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.alloc = InMemoryGrantAllocator(TOTAL_REFS)
        self.tag = None
        self.maps = []
        self.pools = []
        self.outcomes = {}  # op id -> ["completed" | "cancelled", ...]
        self.op_of = {}  # map index -> op id of its deferred load
        self.expected = {}  # op id -> expected pieces of the whole map when it completes
        self.next_op = 0
        self.deferred_ever = set()  # ops that returned EINPROGRESS

    @initialize(params=tag_params())
    def make_tag(self, params):
        self.tag = DmaTag(self.alloc, domid=3, **params)
        self.maps = [self.tag.create_map() for _ in range(N_MAPS)]

    # -- helpers
    def _callback(self, index, op):
        def done(segments):
            m = self.maps[index]
            assert m.state is MapState.LOADED
            assert segments == m.segments
            assert shape(segments) == self.expected[op]
            for seg in segments:  # refs are allocated and granted when the client runs
                entry = self.alloc.grant_entry(seg.gref)
                assert entry is not None and entry.frame == seg.frame and entry.domid == 3
            if op in self.deferred_ever:
                event("deferred load completed")
                assert self.op_of.pop(index) == op
            self.outcomes[op].append("completed")

        return done

    def _start(self, index, buffer, nowait, pool_index, extend):
        m = self.maps[index]
        held = m.segments if extend else ()
        expected = oracle(self.tag, buffer, len(held), sum(s.length for s in held))
        pool = self.pools[pool_index % len(self.pools)] if (pool_index is not None and self.pools) else None
        outstanding, free = self.alloc.outstanding, self.alloc.free_count
        op = self.next_op
        self.next_op += 1
        self.outcomes[op] = []
        flags = DmaFlags.NOWAIT if nowait else DmaFlags.WAITOK
        if isinstance(expected, str):
            with pytest.raises(GrantDmaError) as excinfo:
                self._call(m, buffer, op, index, flags, pool, extend)
            assert rule_of(excinfo) == expected
            assert self.alloc.outstanding == outstanding and m.segments == held
            event(f"refused: {expected}")
            return
        self.expected[op] = shape(held) + expected
        need = len(expected)
        if pool is not None and pool.available < need:
            with pytest.raises(GrantDmaError) as excinfo:
                self._call(m, buffer, op, index, flags, pool, extend)
            assert rule_of(excinfo) == "reservation.short"
            assert self.alloc.outstanding == outstanding and m.segments == held
            event("refused: reservation.short")
            return
        state = m.state
        status = self._call(m, buffer, op, index, flags, pool, extend)
        event(f"{'extend' if extend else 'load'}{' from pool' if pool else ''}: {status.name}")
        if pool is not None or free >= need:
            assert status is LoadStatus.OK and self.outcomes[op] == ["completed"]
            assert self.alloc.outstanding == outstanding + (0 if pool else need)
        elif nowait:
            assert status is LoadStatus.ENOMEM and self.outcomes[op] == []
            assert m.segments == held and m.state is state
            assert self.alloc.outstanding == outstanding
        else:
            assert status is LoadStatus.EINPROGRESS and m.state is MapState.DEFERRED
            assert self.outcomes[op] == [] and self.alloc.outstanding == outstanding
            self.op_of[index] = op
            self.deferred_ever.add(op)

    def _call(self, m, buffer, op, index, flags, pool, extend):
        cb = self._callback(index, op)
        if extend:
            return m.extend(buffer, cb, flags, reservation=pool)
        return m.load(buffer, DmaDirection.DEVICE_WRITES if op % 2 else DmaDirection.DEVICE_READS, cb, flags, reservation=pool)

    # -- rules
    @rule(index=st.integers(0, N_MAPS - 1), buffer=buffers(), nowait=st.booleans(),
          pool_index=st.none() | st.integers(0, 3))
    def load(self, index, buffer, nowait, pool_index):
        m = self.maps[index]
        if m.state in (MapState.LOADED, MapState.DEFERRED):
            with pytest.raises(GrantDmaError) as excinfo:
                m.load(buffer, DEV_WRITES)
            assert rule_of(excinfo) == "map.busy"
            return
        self._start(index, buffer, nowait, pool_index, extend=False)

    @rule(index=st.integers(0, N_MAPS - 1), buffer=buffers(), nowait=st.booleans(),
          pool_index=st.none() | st.integers(0, 3))
    def extend(self, index, buffer, nowait, pool_index):
        m = self.maps[index]
        if m.state is not MapState.LOADED:
            with pytest.raises(GrantDmaError) as excinfo:
                m.extend(buffer)
            assert rule_of(excinfo) == "map.not_loaded"
            return
        self._start(index, buffer, nowait, pool_index, extend=True)

    @rule(index=st.integers(0, N_MAPS - 1))
    def unload(self, index):
        m = self.maps[index]
        was = m.state
        mapped = [s for s in m.segments if self.alloc.peer_mapped(s.gref)]
        still = m.unload()
        assert list(still) == mapped
        assert m.state is (was if was in (MapState.IDLE, MapState.UNLOADED) else MapState.UNLOADED)
        if still:
            event("unload: still mapped")
        if was is MapState.DEFERRED:
            event("unload: cancelled a deferred load")
            self.outcomes[self.op_of.pop(index)].append("cancelled")

    @precondition(lambda self: any(m.segments for m in self.maps))
    @rule(index=st.integers(0, N_MAPS - 1), which=st.integers(0, 20))
    def peer_maps_a_segment(self, index, which):
        loaded = [m for m in self.maps if m.segments]
        segments = loaded[index % len(loaded)].segments
        seg = segments[which % len(segments)]
        writable = not self.alloc.grant_entry(seg.gref).readonly
        self.alloc.peer_map(seg.gref, writable=writable)

    @precondition(lambda self: any(self.alloc.peer_mapped(r) for r in self.alloc.grants))
    @rule(which=st.integers(0, 20))
    def peer_unmaps(self, which):
        mapped = sorted(r for r in self.alloc.grants if self.alloc.peer_mapped(r))
        self.alloc.peer_unmap(mapped[which % len(mapped)])

    @rule()
    def retry_quarantine(self):
        before = self.tag.quarantined
        freed = self.tag.retry_quarantine()
        if freed:
            event("quarantine: revoked")
        assert all(s in before for s in freed)
        assert not any(self.alloc.peer_mapped(s.gref) for s in freed)
        assert all(self.alloc.peer_mapped(s.gref) for s in self.tag.quarantined)

    @rule(count=st.integers(1, 3))
    def reserve(self, count):
        free = self.alloc.free_count
        pool = GrantReservation.reserve(self.alloc, count)
        assert (pool is None) == (free < count)
        if pool is not None:
            self.pools.append(pool)

    @precondition(lambda self: self.pools)
    @rule(which=st.integers(0, 3))
    def release_pool(self, which):
        pool = self.pools.pop(which % len(self.pools))
        pool.release()  # may wake deferred loads; the invariants check where the refs went
        assert pool.released and pool.available == 0

    # -- invariants
    def _held_refs(self):
        refs = [g for m in self.maps for g in m.grefs]
        refs += [g for pool in self.pools for g in pool.refs]
        refs += [s.gref for s in self.tag.quarantined] if self.tag else []
        return refs

    @invariant()
    def no_leak_and_no_double_hand_out(self):
        if self.tag is None:
            return
        refs = self._held_refs()
        assert len(refs) == len(set(refs)), "a ref is held twice"
        assert set(refs) == self.alloc.allocated
        assert self.alloc.outstanding == len(refs)
        granted = {g for m in self.maps for g in m.grefs} | {s.gref for s in self.tag.quarantined}
        assert set(self.alloc.grants) == granted

    @invariant()
    def segments_respect_the_tag(self):
        if self.tag is None:
            return
        t = self.tag
        for m in self.maps:
            segments = m.segments
            assert len(segments) <= t.max_segments
            assert sum(s.length for s in segments) <= t.max_size
            for s in segments:
                assert s.offset + s.length <= PAGE_SIZE
                assert s.length <= t.max_segment_size
                assert s.address % t.alignment == 0
                if t.boundary:
                    assert s.address // t.boundary == (s.address + s.length - 1) // t.boundary
                entry = self.alloc.grant_entry(s.gref)
                assert entry.frame == s.frame and entry.readonly == m.direction.readonly

    @invariant()
    def deferred_loads_wait_and_callbacks_run_at_most_once(self):
        deferred = [i for i, m in enumerate(self.maps) if m.state is MapState.DEFERRED]
        assert sorted(deferred) == sorted(self.op_of)
        # One free-callback registration per deferred load: none stale, none lost.
        assert self.alloc.waiting_callbacks == len(deferred)
        for op in self.op_of.values():
            assert self.outcomes[op] == []
        for out in self.outcomes.values():
            assert len(out) <= 1

    def teardown(self):
        if self.tag is None:
            return
        for ref in list(self.alloc.grants):
            while self.alloc.peer_mapped(ref):
                self.alloc.peer_unmap(ref)
        self.tag.retry_quarantine()
        assert self.tag.quarantined == ()
        for pool in self.pools:
            pool.release()
        self.pools = []
        # Every deferred load must complete once refs come back: unload the loaded maps
        # until none waits (each round frees refs and wakes at least one waiter). Deferred
        # extensions keep their refs while waiting (hold-and-wait, as in bus_dma): when only
        # those are left they may wait on each other, so one is cancelled.
        for _ in range(4 * N_MAPS):
            if not self.op_of:
                break
            loaded = [m for m in self.maps if m.state is MapState.LOADED]
            for m in loaded:
                m.unload()
            if loaded:
                continue
            holders = [i for i in self.op_of if self.maps[i].segments]
            assert holders, "a deferred load waits while every ref is free"
            self.maps[holders[0]].unload()
            self.outcomes[self.op_of.pop(holders[0])].append("cancelled")
        assert not self.op_of
        assert not any(m.state is MapState.DEFERRED for m in self.maps)
        for m in self.maps:
            assert m.unload() == ()
            m.destroy()
        self.tag.destroy()
        # Every deferred load either completed or was cancelled, exactly once.
        for op in self.deferred_ever:
            assert len(self.outcomes[op]) == 1, (op, self.outcomes[op])
        assert self.alloc.outstanding == 0 and self.alloc.grants == {}
        assert self.alloc.waiting_callbacks == 0


GrantDmaMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_grant_dma_state_machine = GrantDmaMachine.TestCase
