"""blkfront's pure parts, without a platform: the ring codec, the response checks of a queue,
the staging runs, the grant pool (with a fake gntshr), vbd specs and the configuration.

The codec is checked against xentools.core.blkif (the reference encoders/decoders) on both
ABIs; the response checks against a backend half (BackRing) writing into the same memory.
"""

from __future__ import annotations

import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.core.blkif import (
    ABIS,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    DiscardRequest,
    Field,
    IndirectRequest,
    Request,
    Response,
    Segment,
    StructLayout,
    codec_for,
    decode_response,
    encode_request,
    encode_response,
)
from xentools.core.errors import GrantDmaError
from xentools.core.grant_dma import DmaDirection, DmaFlags, DmaTag, LinearBuffer, LoadStatus
from xentools.core.ring import BackRing
from xentools.devices.blkfront import BlkfrontConfig, BlkfrontError, frontend_path_for
from xentools.devices.blkfront_pool import PoolGrantAllocator, StagingArea
from xentools.devices.blkfront_queue import BlkfrontQueue, InFlight
from xentools.platform.interface import GrantSharer, GrantStillMapped, SharedPages

ABI_NAMES = sorted(ABIS)
u64 = st.integers(0, 2**64 - 1)
segments = st.builds(
    lambda gref, a, b: Segment(gref, min(a, b), max(a, b)),
    st.integers(0, 2**32 - 1), st.integers(0, 7), st.integers(0, 7),
)


# --- the codec -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ABI_NAMES), st.sampled_from([0, 1, 2, 3]), st.integers(0, 2**16 - 1), u64, u64,
       st.lists(segments, min_size=1, max_size=11))
def test_rw_request_is_the_reference_encoding(abi_name, op, handle, req_id, sector, segs):
    codec = codec_for(ABIS[abi_name])
    packed = b"".join(
        s.gref.to_bytes(4, "little") + bytes([s.first_sect, s.last_sect, 0, 0]) for s in segs
    )
    ours = codec.rw_request(op, handle, req_id, sector, packed, len(segs))
    assert bytes(ours) == encode_request(Request(op, handle, req_id, sector, tuple(segs)), ABIS[abi_name])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(ABI_NAMES), st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE]), st.integers(0, 2**16 - 1),
       u64, u64, st.integers(1, 4096), st.data())
def test_indirect_request_is_the_reference_encoding(abi_name, op, handle, req_id, sector, nseg, data):
    pages = -(-nseg // 512)
    grefs = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=pages, max_size=pages))
    codec = codec_for(ABIS[abi_name])
    ours = codec.indirect_request(op, handle, req_id, sector, nseg, grefs)
    reference = encode_request(IndirectRequest(op, handle, req_id, sector, nseg, tuple(grefs)), ABIS[abi_name])
    assert ours == reference


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(ABI_NAMES), st.integers(0, 2**16 - 1), u64, st.integers(0, 2**63), st.integers(0, 2**63),
       st.booleans())
def test_discard_request_is_the_reference_encoding(abi_name, handle, req_id, sector, nr, secure):
    codec = codec_for(ABIS[abi_name])
    ours = codec.discard_request(handle, req_id, sector, nr, secure)
    assert ours == encode_request(DiscardRequest(handle, req_id, sector, nr, secure), ABIS[abi_name])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ABI_NAMES), u64, st.sampled_from([0, 1, 2, 3, 5, 6]), st.integers(-(2**15), 2**15 - 1))
def test_response_unpack_is_the_reference_decoding(abi_name, rsp_id, op, status):
    abi = ABIS[abi_name]
    raw = encode_response(Response(rsp_id, op, status), abi) + b"\xee" * 8  # trailing bytes ignored
    assert codec_for(abi).response.unpack_from(raw) == tuple(vars(decode_response(raw, abi)).values())


def _layout(fields, size=None):
    """The core's struct builder over ad-hoc (offset, code) members."""
    ctypes = {"B": "uint8_t", "H": "uint16_t", "I": "uint32_t", "Q": "uint64_t"}
    members = tuple(Field(f"f{i}", offset, ctypes[code]) for i, (offset, code) in enumerate(fields))
    layout = StructLayout("struct probe", size or 0, members)
    return layout.compile(size=size)


def test_layout_refuses_overlapping_fields():
    with pytest.raises(ValueError, match="overlaps"):
        _layout([(0, "Q"), (4, "I")])
    with pytest.raises(ValueError, match="past size"):
        _layout([(0, "Q")], 4)
    assert _layout([(2, "H"), (0, "B")], 8).format == "<B1xH4x"


# --- a queue's response checks --------------------------------------------------------------


class _Pages(SharedPages):
    def __init__(self, npages: int) -> None:
        self.domid = 0
        self.refs = tuple(range(100, 100 + npages))
        self.writable = True
        self._buf = memoryview(bytearray(4096 * npages))

    @property
    def buf(self) -> memoryview:
        return self._buf


def _queue(abi_name: str = "x86_64-abi"):
    pages = _Pages(1)
    queue = BlkfrontQueue(0, codec_for(ABIS[abi_name]), pages, 0, None, 7)
    back = BackRing(queue.ring.shared, None)
    return queue, back


def _submit(queue: BlkfrontQueue, back: BackRing, op: int = BLKIF_OP_READ, indirect: bool = False) -> InFlight:
    entry = InFlight()
    entry.op = BLKIF_OP_INDIRECT if indirect else op
    entry.rsp_op = op
    assert queue.claim_slot(entry)
    queue.put(bytes(queue.codec.request_size))
    queue.push()
    assert back.unconsumed_requests() >= 1
    back.get_request()
    return entry


def _answer(queue, back, req_id, op, status=0) -> None:
    back.put_response(encode_response(Response(req_id, op, status), queue.codec.abi))
    back.push_responses_and_check_notify()


@pytest.mark.parametrize("abi_name", ABI_NAMES)
def test_valid_responses_complete_in_order(abi_name):
    queue, back = _queue(abi_name)
    a = _submit(queue, back)
    b = _submit(queue, back, BLKIF_OP_WRITE, indirect=True)
    c = _submit(queue, back, BLKIF_OP_READ, indirect=True)
    _answer(queue, back, a.id, BLKIF_OP_READ)
    _answer(queue, back, b.id, BLKIF_OP_WRITE, -1)  # inner op for INDIRECT, as Linux blkback
    _answer(queue, back, c.id, BLKIF_OP_INDIRECT, -2)  # INDIRECT echoed, as blkif.h allows
    done, violation = queue.take_responses()
    assert violation is None
    assert [(e, s) for e, s in done] == [(a, 0), (b, -1), (c, -2)]
    assert queue.in_flight == 0 and len(queue.free_slots) == queue.size


@pytest.mark.parametrize(
    ("mischief", "rule"),
    [
        (lambda q, e: (e.id + q.size, BLKIF_OP_READ, 0), "response.id"),  # stale: slot reused
        (lambda q, e: (e.id ^ 1, BLKIF_OP_READ, 0), "response.id"),  # another slot, empty
        (lambda q, e: (e.id, BLKIF_OP_WRITE, 0), "response.op"),
        (lambda q, e: (e.id, BLKIF_OP_INDIRECT, 0), "response.op"),  # not an indirect request
        (lambda q, e: (e.id, BLKIF_OP_READ, 3), "response.status"),
        (lambda q, e: (e.id, BLKIF_OP_READ, -32768), "response.status"),
    ],
)
def test_bad_response_is_a_violation_after_the_good_ones(mischief, rule):
    queue, back = _queue()
    good = _submit(queue, back)
    bad = _submit(queue, back)
    _answer(queue, back, good.id, BLKIF_OP_READ)
    _answer(queue, back, *mischief(queue, bad))
    done, violation = queue.take_responses()
    assert [e for e, _ in done] == [good]
    assert violation is not None and violation.rule == rule
    assert queue.shadow[bad.slot] is bad  # still waiting: the device fails it


def test_duplicate_response_is_caught_even_when_its_slot_is_reused():
    queue, back = _queue()
    first = _submit(queue, back)
    _answer(queue, back, first.id, BLKIF_OP_READ)
    assert queue.take_responses()[0] == [(first, 0)]
    second = _submit(queue, back)  # may reuse the slot, never the id
    assert second.id != first.id
    back.put_response(encode_response(Response(first.id, BLKIF_OP_READ, 0), queue.codec.abi))
    back.push_responses_and_check_notify()
    done, violation = queue.take_responses()
    assert done == [] and violation.rule == "response.id"


@pytest.mark.parametrize("jump", [129, 33, 2**31, 2**32 - 1])
def test_rsp_prod_past_the_ring_is_a_violation(jump):
    queue, back = _queue()
    _submit(queue, back)
    queue.ring.shared.rsp_prod = jump  # ring of 32: anything over 32 ahead (or behind)
    done, violation = queue.take_responses()
    assert done == [] and violation.rule == "ring.rsp_overflow"


def test_spurious_check_finds_nothing_and_arms_the_event():
    queue, back = _queue()
    assert queue.take_responses() == ([], None)
    assert queue.ring.shared.rsp_event == 1


# --- the grant pool -------------------------------------------------------------------------


class FakeSharer(GrantSharer):
    """gntshr without a platform: refs from 1000 up; a test marks refs as mapped."""

    def __init__(self) -> None:
        self.next_ref = 1000
        self.shared: list[SharedPages] = []
        self.mapped: set[int] = set()
        self.calls = 0

    def share(self, domid, count, writable=True):
        self.calls += 1
        pages = _Pages(count)
        pages.domid = domid
        pages.refs = tuple(range(self.next_ref, self.next_ref + count))
        self.next_ref += count
        self.shared.append(pages)
        return pages

    def unshare(self, pages):
        if self.mapped & set(pages.refs):
            raise GrantStillMapped("still mapped")
        self.shared.remove(pages)

    def is_mapped(self, pages):
        return bool(self.mapped & set(pages.refs))

    def close(self):
        self.shared.clear()


def test_pool_shares_lazily_within_the_budget():
    sharer = FakeSharer()
    pool = PoolGrantAllocator(sharer, 3, max_pages=20, extent_pages=8, check_mapped=False)
    assert pool.shared_pages == 0
    refs = pool.alloc(3)
    assert pool.shared_pages == 8 and sharer.calls == 1 and len(set(refs)) == 3
    assert pool.run(tuple(refs)) is not None  # consecutive pages of one extent
    more = pool.alloc(12)
    assert more is not None and pool.shared_pages == 16
    assert pool.alloc(6) is None  # 1 free + 4 within the budget
    assert pool.alloc(5) is not None and pool.shared_pages == 20  # a short last extent
    assert pool.alloc(1) is None
    pool.free(refs)
    assert pool.alloc(3) is not None


def test_pool_binds_frames_and_refuses_misuse():
    pool = PoolGrantAllocator(FakeSharer(), 3, max_pages=8, extent_pages=8, check_mapped=False)
    (ref,) = pool.alloc(1)
    with pytest.raises(GrantDmaError, match="pool.domid"):
        pool.grant(ref, 4, 0, False)
    pool.grant(ref, 3, 77, False)
    with pytest.raises(GrantDmaError, match="pool.regrant"):
        pool.grant(ref, 3, 78, False)
    with pytest.raises(GrantDmaError, match="pool.free_bound"):
        pool.free([ref])
    assert pool.end_access(ref)
    pool.free([ref])
    with pytest.raises(GrantDmaError, match="pool.double_free"):
        pool.free([ref])


def test_non_persistent_maps_defer_and_quarantine_pages_still_mapped():
    sharer = FakeSharer()
    pool = PoolGrantAllocator(sharer, 3, max_pages=4, extent_pages=1, check_mapped=True)
    tag = DmaTag(pool, domid=3, max_segments=4)
    first, second = tag.create_map(), tag.create_map()
    assert first.load(LinearBuffer(0, 3 * 4096), DmaDirection.DEVICE_WRITES) is LoadStatus.OK
    got = []
    status = second.load(LinearBuffer(1 << 30, 2 * 4096), DmaDirection.DEVICE_READS, got.append, DmaFlags.WAITOK)
    assert status is LoadStatus.EINPROGRESS and got == []
    sharer.mapped.add(first.grefs[0])  # the backend still maps one page after answering
    assert [seg.gref for seg in first.unload()] == [sharer.mapped.pop()]
    assert len(got) == 1 and len(got[0]) == 2  # the two revoked pages went to the waiter
    assert tag.quarantined and pool.outstanding == 3
    assert pool.close() == 0 and sharer.shared == []


def test_pool_close_leaks_what_the_backend_still_maps():
    sharer = FakeSharer()
    pool = PoolGrantAllocator(sharer, 3, max_pages=16, extent_pages=8, check_mapped=False)
    refs = pool.alloc(16)
    sharer.mapped.add(refs[9])
    assert pool.close() == 8 and len(sharer.shared) == 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9)), max_size=60), st.randoms())
def test_staging_runs_never_overlap_and_merge_back(steps, rnd):
    pool = PoolGrantAllocator(FakeSharer(), 3, max_pages=40, extent_pages=20, check_mapped=False)
    area = StagingArea(pool, 3, buffer_pages=20, sectors_per_page=8)
    held: list[tuple] = []
    owner: dict[tuple[int, int], int] = {}
    for take, npages in steps:
        if take or not held:
            got = area.take(npages)
            if got is None:
                assert sum(b.free_pages for b in area.buffers) < npages * len(area.buffers) + 20
                continue
            buf, start = got
            assert start + npages <= len(buf.refs)
            for page in range(start, start + npages):
                assert (buf.index, page) not in owner
                owner[(buf.index, page)] = 1
            held.append((buf, start, npages))
        else:
            buf, start, npages = held.pop(rnd.randrange(len(held)))
            buf.give(start, npages)
            for page in range(start, start + npages):
                del owner[(buf.index, page)]
    for buf, start, npages in held:
        buf.give(start, npages)
    for buf in area.buffers:
        assert buf.free_pages == len(buf.refs) and buf._free_runs == [[0, len(buf.refs)]]
        assert buf.view is not None and len(buf.segments) == 8 * len(buf.refs)
    assert area.unload() == 0


# --- specs and configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ("xvda", "/local/domain/1/device/vbd/51712"),
        ("xvdb", "/local/domain/1/device/vbd/51728"),
        ("51712", "/local/domain/1/device/vbd/51712"),
        (768, "/local/domain/1/device/vbd/768"),
        ("/local/domain/1/device/vbd/5", "/local/domain/1/device/vbd/5"),
    ],
)
def test_vbd_specs(spec, path):
    assert frontend_path_for(1, spec) == path


@pytest.mark.parametrize("spec", ["", "xvd", "xvda99999", "abc", "/a//b", "/a/b/", 1.5, None, True])
def test_bad_vbd_specs(spec):
    with pytest.raises(BlkfrontError, match="vbd.spec"):
        frontend_path_for(1, spec)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ring_page_order": 5}, {"num_queues": 0}, {"max_indirect_segments": 4097}, {"max_grants": 8},
        {"persistent": 1}, {"protocol": "arm-abi"}, {"connect_timeout": 0}, {"request_timeout": True},
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(BlkfrontError, match="config."):
        BlkfrontConfig(**kwargs)


def test_ids_are_unique_and_map_to_their_slot():
    queue, back = _queue()
    seen = set()
    rng = random.Random(3)
    live = []
    for _ in range(500):
        if live and (rng.random() < 0.5 or not queue.free_slots):
            queue.release_slot(live.pop(rng.randrange(len(live))))
            continue
        entry = InFlight()
        assert queue.claim_slot(entry)
        assert entry.id not in seen and entry.id & queue.mask == entry.slot
        seen.add(entry.id)
        live.append(entry)


