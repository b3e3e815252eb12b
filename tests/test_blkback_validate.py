"""blkback request validation: every rule of blkback_validate.RULES, table-driven, on both
ABIs; agreement with blkif.decode_request on the structural rules; response bytes equal to
blkif.encode_response (XSA-216)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.core import blkif
from xentools.core.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_RESERVED_1,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    X86_32,
    X86_64,
    DiscardRequest,
    IndirectRequest,
    Request,
    Response,
    Segment,
    codec_for,
)
from xentools.core.errors import BlkifError
from xentools.devices.blkback_validate import (
    RULES,
    RequestPolicy,
    RequestRejected,
    parse_indirect_segments,
    parse_request,
)

BOTH = pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
DISK = 1 << 20  # bytes: 2048 sectors of 512
FULL = RequestPolicy(disk_bytes=DISK, max_indirect_segments=256, flush_cache=True, barrier=True, discard=True)


def slot_of(req, abi) -> bytes:
    """A whole ring slot (entry_size bytes), as BackRing.get_request hands it out."""
    data = blkif.encode_request(req, abi)
    return data + bytes(abi.entry_size - len(data))


def raw_slot(abi, fields: dict[int, tuple[str, int]]) -> bytes:
    buf = bytearray(abi.entry_size)
    for offset, (fmt, value) in fields.items():
        struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def seg(first=0, last=7, gref=9):
    return Segment(gref, first, last)


def rw(op=BLKIF_OP_READ, sector=0, segs=(None,)):
    return Request(op, 0, 77, sector, tuple(s or seg() for s in segs))


def direct_with(abi, op, nr_segments, seg_bytes=b"", sector=0):
    fields = {abi.req_operation: ("<B", op), abi.req_nr_segments: ("<B", nr_segments),
              abi.req_id: ("<Q", 77), abi.req_sector_number: ("<Q", sector)}
    buf = bytearray(raw_slot(abi, fields))
    buf[abi.req_seg : abi.req_seg + len(seg_bytes)] = seg_bytes
    return bytes(buf)


def indirect(op=BLKIF_OP_READ, nseg=16, sector=0):
    return IndirectRequest(op, 0, 77, sector, nseg, tuple(range(100, 100 + blkif.indirect_pages_for(nseg))))


# (case id, slot builder(abi), policy, rule) -- one row per rule, some rules several times.
CASES = [
    ("unknown op", lambda a: raw_slot(a, {0: ("<B", 200), a.req_id: ("<Q", 77)}), FULL, "request.op"),
    ("reserved op", lambda a: raw_slot(a, {0: ("<B", BLKIF_OP_RESERVED_1), a.req_id: ("<Q", 77)}), FULL, "request.op"),
    ("read 0 segments", lambda a: direct_with(a, BLKIF_OP_READ, 0), FULL, "request.nr_segments"),
    ("write 12 segments", lambda a: direct_with(a, BLKIF_OP_WRITE, 12, bytes(96)), FULL, "request.nr_segments"),
    ("flush 255 segments", lambda a: direct_with(a, BLKIF_OP_FLUSH_DISKCACHE, 255), FULL, "request.nr_segments"),
    ("last_sect 8", lambda a: direct_with(a, BLKIF_OP_READ, 1, struct.pack("<IBBxx", 9, 0, 8)), FULL, "segment.last_sect"),
    ("last_sect 255", lambda a: direct_with(a, BLKIF_OP_WRITE, 2, struct.pack("<IBBxx", 9, 0, 7) + struct.pack("<IBBxx", 9, 0, 255)), FULL, "segment.last_sect"),
    ("first > last", lambda a: direct_with(a, BLKIF_OP_READ, 1, struct.pack("<IBBxx", 9, 5, 4)), FULL, "segment.first_sect"),
    ("read past disk", lambda a: slot_of(rw(sector=2047, segs=(seg(0, 1),)), a), FULL, "request.beyond_disk"),
    ("write past 2**64", lambda a: slot_of(rw(BLKIF_OP_WRITE, sector=2**64 - 1), a), FULL, "request.beyond_disk"),
    ("barrier data past disk", lambda a: slot_of(Request(BLKIF_OP_WRITE_BARRIER, 0, 77, 2048, (seg(),)), a), FULL, "request.beyond_disk"),
    ("write read-only", lambda a: slot_of(rw(BLKIF_OP_WRITE), a), RequestPolicy(DISK, readonly=True), "request.readonly_write"),
    ("flush data read-only", lambda a: slot_of(Request(BLKIF_OP_FLUSH_DISKCACHE, 0, 77, 0, (seg(),)), a), RequestPolicy(DISK, readonly=True), "request.readonly_write"),
    ("discard read-only", lambda a: slot_of(DiscardRequest(0, 77, 0, 8), a), RequestPolicy(DISK, readonly=True, discard=True), "request.readonly_write"),
    ("indirect write read-only", lambda a: slot_of(indirect(BLKIF_OP_WRITE), a), RequestPolicy(DISK, readonly=True, max_indirect_segments=256), "request.readonly_write"),
    ("flush not offered", lambda a: slot_of(Request(BLKIF_OP_FLUSH_DISKCACHE, 0, 77, 0, ()), a), RequestPolicy(DISK, flush_cache=False), "request.flush_not_advertised"),
    ("barrier not offered", lambda a: slot_of(Request(BLKIF_OP_WRITE_BARRIER, 0, 77, 0, ()), a), RequestPolicy(DISK, barrier=False), "request.barrier_not_advertised"),
    ("discard not offered", lambda a: slot_of(DiscardRequest(0, 77, 0, 8), a), RequestPolicy(DISK), "discard.not_advertised"),
    ("discard flag", lambda a: raw_slot(a, {0: ("<B", BLKIF_OP_DISCARD), a.discard_flag: ("<B", 2), a.discard_id: ("<Q", 77)}), FULL, "discard.flag"),
    ("secure discard", lambda a: slot_of(DiscardRequest(0, 77, 0, 8, True), a), FULL, "discard.secure_not_advertised"),
    ("discard past disk", lambda a: slot_of(DiscardRequest(0, 77, 2040, 9), a), FULL, "discard.beyond_disk"),
    ("discard huge", lambda a: slot_of(DiscardRequest(0, 77, 2**63, 2**63), a), FULL, "discard.beyond_disk"),
    ("discard past 2**64", lambda a: raw_slot(a, {0: ("<B", BLKIF_OP_DISCARD), a.discard_id: ("<Q", 77), a.discard_sector_number: ("<Q", 2**63), a.discard_nr_sectors: ("<Q", 2**63 + 1)}), FULL, "discard.range"),
    ("indirect not offered", lambda a: slot_of(indirect(), a), RequestPolicy(DISK), "indirect.not_advertised"),
    ("indirect op flush", lambda a: raw_slot(a, {0: ("<B", BLKIF_OP_INDIRECT), a.indirect_indirect_op: ("<B", BLKIF_OP_FLUSH_DISKCACHE), a.indirect_nr_segments: ("<H", 4), a.indirect_id: ("<Q", 77)}), FULL, "indirect.op"),
    ("indirect op indirect", lambda a: raw_slot(a, {0: ("<B", BLKIF_OP_INDIRECT), a.indirect_indirect_op: ("<B", BLKIF_OP_INDIRECT), a.indirect_nr_segments: ("<H", 4), a.indirect_id: ("<Q", 77)}), FULL, "indirect.op"),
    ("indirect 0 segments", lambda a: raw_slot(a, {0: ("<B", BLKIF_OP_INDIRECT), a.indirect_nr_segments: ("<H", 0), a.indirect_id: ("<Q", 77)}), FULL, "indirect.nr_segments"),
    ("indirect 4097 segments", lambda a: raw_slot(a, {0: ("<B", BLKIF_OP_INDIRECT), a.indirect_nr_segments: ("<H", 4097), a.indirect_id: ("<Q", 77)}), RequestPolicy(DISK, max_indirect_segments=4096), "indirect.nr_segments"),
    ("indirect over advertised", lambda a: slot_of(indirect(nseg=257), a), FULL, "indirect.too_many_segments"),
    ("indirect over 11", lambda a: slot_of(indirect(nseg=12), a), RequestPolicy(DISK, max_indirect_segments=11), "indirect.too_many_segments"),
]


def test_every_request_rule_has_a_case() -> None:
    mapping_rules = {"segment.gref_unmappable", "indirect.gref_unmappable"}  # need a platform
    covered = {rule for *_, rule in CASES} | mapping_rules
    assert covered == set(RULES)


@BOTH
@pytest.mark.parametrize("name,build,policy,rule", CASES, ids=[c[0] for c in CASES])
def test_rule(abi, name, build, policy, rule) -> None:
    layout = codec_for(abi)
    with pytest.raises(RequestRejected) as info:
        parse_request(build(abi), layout, policy)
    assert info.value.rule == rule
    assert info.value.status == RULES[rule][0]
    assert info.value.status in (BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)
    assert str(info.value).startswith(rule + ": ")
    # The id is always recoverable for the response, whatever was wrong.
    assert layout.header(build(abi))[1] == 77


def test_unknown_operations_are_eopnotsupp_malformed_are_error() -> None:
    assert RULES["request.op"][0] == BLKIF_RSP_EOPNOTSUPP
    assert RULES["discard.not_advertised"][0] == BLKIF_RSP_EOPNOTSUPP
    assert RULES["request.beyond_disk"][0] == BLKIF_RSP_ERROR
    assert RULES["segment.last_sect"][0] == BLKIF_RSP_ERROR


@BOTH
def test_valid_requests_plan(abi) -> None:
    layout = codec_for(abi)
    plan = parse_request(slot_of(rw(sector=2044, segs=(seg(6, 7), seg(0, 1))), abi), layout, FULL)
    assert (plan.operation, plan.id, plan.offset, plan.nbytes) == (BLKIF_OP_READ, 77, 2044 * 512, 4 * 512)
    assert plan.grefs == (9, 9) and plan.firsts == bytes([6, 0]) and plan.lasts == bytes([7, 1])
    # The last sector of the disk is inside it.
    parse_request(slot_of(rw(sector=2047, segs=(seg(0, 0),)), abi), layout, FULL)
    flush = parse_request(slot_of(Request(BLKIF_OP_FLUSH_DISKCACHE, 0, 5, 2**64 - 1, ()), abi), layout, FULL)
    assert flush.nbytes == 0 and flush.grefs == ()  # a flush without data ignores its sector
    discard = parse_request(slot_of(DiscardRequest(0, 6, 2040, 8), abi), layout, FULL)
    assert (discard.offset, discard.nbytes) == (2040 * 512, 4096)
    # Reads stay allowed on a read-only disk, and so does a flush without data.
    ro = RequestPolicy(DISK, readonly=True)
    parse_request(slot_of(rw(), abi), layout, ro)
    parse_request(slot_of(Request(BLKIF_OP_FLUSH_DISKCACHE, 0, 5, 0, ()), abi), layout, ro)


@BOTH
def test_indirect_plan_and_segment_pages(abi) -> None:
    layout = codec_for(abi)
    segs = [Segment(1000 + i, 0, 7) for i in range(600)]
    req = IndirectRequest(BLKIF_OP_WRITE, 0, 77, 8, 600, (50, 51))
    policy = RequestPolicy(8 * DISK, max_indirect_segments=4096)
    plan = parse_request(slot_of(req, abi), layout, policy)
    assert plan.operation == BLKIF_OP_INDIRECT and plan.rsp_operation == BLKIF_OP_WRITE
    assert plan.indirect_grefs == (50, 51) and plan.nr_segments == 600
    assert layout.header(slot_of(req, abi))[2] == BLKIF_OP_WRITE  # answered with the inner op
    pages = [memoryview(bytearray(p)) for p in blkif.encode_indirect_pages(segs)]
    data = parse_indirect_segments(plan, pages, policy)
    assert data.operation == BLKIF_OP_WRITE and data.offset == 8 * 512 and data.nbytes == 600 * 4096
    assert data.grefs == tuple(range(1000, 1600))
    # Stale bytes after the last segment are ignored; a bad segment inside is not.
    pages[1][88 * 8 :] = b"\xff" * (4096 - 88 * 8)
    parse_indirect_segments(plan, pages, policy)
    pages[1][87 * 8 + 5] = 9
    with pytest.raises(RequestRejected, match=r"^segment\.last_sect: .*indirect segment 599"):
        parse_indirect_segments(plan, pages, policy)
    # 600 full pages from sector 8 end exactly at 601 pages: one sector less is too small.
    fresh = [memoryview(bytearray(p)) for p in blkif.encode_indirect_pages(segs)]
    parse_indirect_segments(plan, fresh, RequestPolicy(601 * 4096, max_indirect_segments=4096))
    small = RequestPolicy(601 * 4096 - 512, max_indirect_segments=4096)
    with pytest.raises(RequestRejected, match=r"^request\.beyond_disk"):
        parse_indirect_segments(plan, [memoryview(bytearray(p)) for p in blkif.encode_indirect_pages(segs)], small)


@BOTH
def test_large_sector_size_units(abi) -> None:
    layout = codec_for(abi)
    policy = RequestPolicy(DISK, unit=4096)  # 256 sectors of 4 KiB
    plan = parse_request(slot_of(rw(sector=255, segs=(seg(0, 0),)), abi), layout, policy)
    assert (plan.offset, plan.nbytes) == (255 * 4096, 4096)
    with pytest.raises(RequestRejected, match=r"^segment\.last_sect"):
        parse_request(slot_of(rw(segs=(seg(0, 1),)), abi), layout, policy)
    with pytest.raises(RequestRejected, match=r"^request\.beyond_disk"):
        parse_request(slot_of(rw(sector=256, segs=(seg(0, 0),)), abi), layout, policy)
    half = RequestPolicy(DISK, unit=1024)
    plan = parse_request(slot_of(rw(sector=1, segs=(seg(1, 3),)), abi), layout, half)
    assert (plan.offset, plan.nbytes) == (1024, 3 * 1024)


@BOTH
@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=112, max_size=112))
def test_agrees_with_the_core_decoder(abi, data) -> None:
    """Random slots: whatever blkif.decode_request refuses, the backend refuses with the same
    rule; whatever it accepts passes the structural checks here."""
    slot = data[: abi.entry_size]
    policy = RequestPolicy(2**80, max_indirect_segments=4096, discard=True, discard_secure=True)
    try:
        decoded = blkif.decode_request(slot, abi)
    except BlkifError as err:
        with pytest.raises(RequestRejected) as info:
            parse_request(slot, codec_for(abi), policy)
        assert info.value.rule == err.rule
        return
    plan = parse_request(slot, codec_for(abi), policy)
    assert plan.id == decoded.id
    if isinstance(decoded, Request):
        assert plan.grefs == tuple(s.gref for s in decoded.segments)
        assert plan.nbytes == decoded.nr_bytes
        assert plan.offset == decoded.sector_number * 512 or not decoded.segments
    elif isinstance(decoded, IndirectRequest):
        assert plan.indirect_grefs == decoded.indirect_grefs


@BOTH
@settings(max_examples=50, deadline=None)
@given(rid=st.integers(0, 2**64 - 1), op=st.integers(0, 255), status=st.sampled_from([0, -1, -2]))
def test_response_bytes_equal_encode_response(abi, rid, op, status) -> None:
    assert codec_for(abi).response.pack(rid, op, status) == blkif.encode_response(Response(rid, op, status), abi)
