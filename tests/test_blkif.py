"""Tests of xentools.core.blkif: encode/decode round trips and every validation rule."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.core import blkif
from xentools.core.blkif import (
    ABIS,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_RESERVED_1,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    X86_32,
    X86_64,
    Abi,
    DiscardRequest,
    IndirectRequest,
    Request,
    Response,
    Segment,
)
from xentools.core.errors import BlkifError, ProtocolError

BOTH = pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
U64 = 2**64 - 1

# --- strategies -------------------------------------------------------------------------

sector_pair = st.tuples(st.integers(0, 7), st.integers(0, 7)).map(sorted)
segments_st = st.builds(
    lambda g, p: Segment(g, p[0], p[1]), st.integers(0, 2**32 - 1), sector_pair
)
direct_request_st = st.one_of(
    st.builds(
        Request,
        st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE]),
        st.integers(0, 0xFFFF),
        st.integers(0, U64),
        st.integers(0, U64),
        st.lists(segments_st, min_size=1, max_size=11).map(tuple),
    ),
    st.builds(
        Request,
        st.sampled_from([BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE]),
        st.integers(0, 0xFFFF),
        st.integers(0, U64),
        st.integers(0, U64),
        st.lists(segments_st, min_size=0, max_size=11).map(tuple),
    ),
)


@st.composite
def discard_st(draw: st.DrawFn) -> DiscardRequest:
    sector = draw(st.integers(0, U64))
    nr = draw(st.integers(0, 2**64 - sector))
    nr = min(nr, U64)
    return DiscardRequest(draw(st.integers(0, 0xFFFF)), draw(st.integers(0, U64)), sector, nr,
                          draw(st.booleans()))


@st.composite
def indirect_st(draw: st.DrawFn) -> IndirectRequest:
    nr = draw(st.integers(1, 4096))
    pages = -(-nr // 512)
    grefs = tuple(draw(st.lists(st.integers(0, 2**32 - 1), min_size=pages, max_size=pages)))
    return IndirectRequest(draw(st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE])),
                           draw(st.integers(0, 0xFFFF)), draw(st.integers(0, U64)),
                           draw(st.integers(0, U64)), nr, grefs)


any_request_st = st.one_of(direct_request_st, discard_st(), indirect_st())
response_st = st.builds(
    Response, st.integers(0, U64),
    st.sampled_from([0, 1, 2, 3, 5, 6]), st.integers(-(2**15), 2**15 - 1)
)
abi_st = st.sampled_from([X86_64, X86_32])


def _raises(rule: str):
    return pytest.raises(BlkifError, match=f"^{rule.replace('.', '[.]')}: ")


# --- ABI selection ------------------------------------------------------------------------


def test_abi_for_protocol() -> None:
    assert blkif.abi_for_protocol("x86_64-abi") is X86_64
    assert blkif.abi_for_protocol("x86_32-abi") is X86_32
    assert blkif.abi_for_protocol(None) is X86_64  # absent key: native
    assert ABIS == {"x86_64-abi": X86_64, "x86_32-abi": X86_32}
    for bad in ["arm-abi", "", "x86_64", "X86_64-ABI"]:
        with _raises("protocol.unknown") as info:
            blkif.abi_for_protocol(bad)
        assert info.value.rule == "protocol.unknown"


def test_blkif_error_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        Segment(1, 0, 8)
    assert isinstance(info.value, ValueError)
    assert info.value.rule == "segment.last_sect"
    assert "\n" not in str(info.value)


@BOTH
def test_entry_is_the_larger_struct(abi: Abi) -> None:
    assert abi.entry_size == max(abi.request_size, abi.response_size)
    assert abi.discard_size <= abi.request_size and abi.indirect_size <= abi.request_size


# --- round trips ---------------------------------------------------------------------------

EXAMPLES = [
    Request(BLKIF_OP_READ, 51712, 1, 0, (Segment(8, 0, 7),)),
    Request(BLKIF_OP_WRITE, 0, U64, U64, tuple(Segment(i, i % 8, 7) for i in range(11))),
    Request(BLKIF_OP_WRITE_BARRIER, 5, 2, 3, ()),
    Request(BLKIF_OP_FLUSH_DISKCACHE, 5, 2, 3, (Segment(2**32 - 1, 3, 3),)),
    DiscardRequest(1, 2, 3, 4),
    DiscardRequest(0xFFFF, U64, 0, 2**64 - 1, secure=True),
    IndirectRequest(BLKIF_OP_READ, 7, 8, 9, 1, (77,)),
    IndirectRequest(BLKIF_OP_WRITE, 7, 8, 9, 513, (77, 78)),
    IndirectRequest(BLKIF_OP_WRITE, 7, 8, 9, 4096, tuple(range(8))),
]


@BOTH
@pytest.mark.parametrize("req", EXAMPLES, ids=repr)
def test_request_round_trip(abi: Abi, req: blkif.AnyRequest) -> None:
    raw = blkif.encode_request(req, abi)
    assert len(raw) == abi.request_size
    assert blkif.decode_request(raw, abi) == req
    header = blkif.decode_request_header(raw, abi)
    assert header == blkif.RequestHeader(req.operation, req.id)


@settings(max_examples=150, deadline=None)
@given(req=any_request_st, abi=abi_st)
def test_request_round_trip_property(req: blkif.AnyRequest, abi: Abi) -> None:
    raw = blkif.encode_request(req, abi)
    assert len(raw) == abi.request_size
    assert blkif.decode_request(raw, abi) == req
    assert blkif.encode_request(blkif.decode_request(raw, abi), abi) == raw


@settings(max_examples=100, deadline=None)
@given(rsp=response_st, abi=abi_st)
def test_response_round_trip_property(rsp: Response, abi: Abi) -> None:
    raw = blkif.encode_response(rsp, abi)
    assert len(raw) == abi.response_size
    assert blkif.decode_response(raw, abi) == rsp


def test_abis_lay_out_differently() -> None:
    req = Request(BLKIF_OP_READ, 1, 0x0102030405060708, 2, (Segment(3, 0, 0),))
    raw64, raw32 = blkif.encode_request(req, X86_64), blkif.encode_request(req, X86_32)
    assert struct.unpack_from("<Q", raw64, 8)[0] == 0x0102030405060708
    assert struct.unpack_from("<Q", raw32, 4)[0] == 0x0102030405060708
    # Read with the wrong ABI the id is garbage: the protocol key matters.
    assert blkif.decode_request(raw32, X86_32).id == req.id
    assert blkif.decode_request_header(raw32 + bytes(4), X86_64).id != req.id


# --- decoding whole, truncated, with trailing bytes ------------------------------------------


@BOTH
@pytest.mark.parametrize("req", EXAMPLES, ids=repr)
def test_request_decode_ignores_trailing_bytes_and_never_writes(
    abi: Abi, req: blkif.AnyRequest
) -> None:
    raw = blkif.encode_request(req, abi)
    buf = bytearray(raw + b"\xa5" * 37)
    snapshot = bytes(buf)
    assert blkif.decode_request(buf, abi) == req
    assert blkif.decode_request(memoryview(buf), abi) == req
    assert blkif.decode_request(memoryview(buf)[: abi.request_size], abi) == req
    assert bytes(buf) == snapshot


@BOTH
@pytest.mark.parametrize("req", EXAMPLES, ids=repr)
def test_truncated_request_is_rejected(abi: Abi, req: blkif.AnyRequest) -> None:
    raw = blkif.encode_request(req, abi)
    for length in (0, 1, abi.request_size // 2, abi.request_size - 1):
        with _raises("request.length"):
            blkif.decode_request(raw[:length], abi)
        with _raises("request.length"):
            blkif.decode_request_header(raw[:length], abi)


@BOTH
def test_response_decode_whole_truncated_trailing(abi: Abi) -> None:
    rsp = Response(99, BLKIF_OP_WRITE, BLKIF_RSP_ERROR)
    raw = blkif.encode_response(rsp, abi)
    buf = bytearray(raw + b"\xff" * 100)  # rest of a ring slot: stale request bytes
    snapshot = bytes(buf)
    assert blkif.decode_response(buf, abi) == rsp
    assert blkif.decode_response(memoryview(buf), abi) == rsp
    assert bytes(buf) == snapshot
    for length in range(abi.response_size):
        with _raises("response.length"):
            blkif.decode_response(raw[:length], abi)


@BOTH
def test_decode_reads_a_private_copy(abi: Abi) -> None:
    """The decoded object does not change when the shared bytes change afterwards."""
    req = Request(BLKIF_OP_WRITE, 1, 2, 3, (Segment(4, 0, 7),))
    shared = bytearray(blkif.encode_request(req, abi))
    decoded = blkif.decode_request(memoryview(shared), abi)
    shared[abi.req_nr_segments] = 11
    shared[abi.req_seg + abi.seg_last_sect] = 200
    assert decoded == req


@BOTH
def test_unused_segment_slots_and_grefs_are_ignored(abi: Abi) -> None:
    req = Request(BLKIF_OP_READ, 1, 2, 3, (Segment(4, 2, 5),))
    raw = bytearray(blkif.encode_request(req, abi))
    # Stale, invalid segments after nr_segments (frontends leave old data there).
    for i in range(1, 11):
        base = abi.req_seg + i * abi.segment_size
        raw[base + abi.seg_first_sect] = 9
        raw[base + abi.seg_last_sect] = 200
    assert blkif.decode_request(bytes(raw), abi) == req
    ind = IndirectRequest(BLKIF_OP_READ, 1, 2, 3, 600, (10, 11))
    raw = bytearray(blkif.encode_request(ind, abi))
    struct.pack_into("<6I", raw, abi.indirect_grefs + 8, *range(100, 106))
    assert blkif.decode_request(bytes(raw), abi) == ind


# --- padding ---------------------------------------------------------------------------------


def _field_bytes(abi: Abi, spans: list[tuple[int, int]]) -> set[int]:
    return {b for offset, width in spans for b in range(offset, offset + width)}


@BOTH
def test_encoded_response_padding_is_zero(abi: Abi) -> None:
    rsp = Response(U64, 0xFF, -1)
    raw = blkif.encode_response(rsp, abi)
    used = _field_bytes(abi, [(abi.rsp_id, 8), (abi.rsp_operation, 1), (abi.rsp_status, 2)])
    assert len(raw) == abi.response_size
    assert all(raw[i] == 0 for i in range(len(raw)) if i not in used)
    assert all(raw[i] != 0 for i in used)  # the fields really are where `used` says


@BOTH
def test_encoded_request_padding_is_zero(abi: Abi) -> None:
    req = Request(BLKIF_OP_WRITE, 0xFFFF, U64, U64, (Segment(2**32 - 1, 7, 7),))
    raw = blkif.encode_request(req, abi)
    used = _field_bytes(abi, [(0, 4), (abi.req_id, 8), (abi.req_sector_number, 8),
                              (abi.req_seg, 4), (abi.req_seg + 4, 2)])
    assert all(raw[i] == 0 for i in range(len(raw)) if i not in used)
    ind = IndirectRequest(BLKIF_OP_WRITE, 0xFFFF, U64, U64, 0xFFF, (2**32 - 1,) * 8)
    raw = blkif.encode_request(ind, abi)
    used = _field_bytes(abi, [(0, 4), (abi.indirect_id, 8), (abi.indirect_sector_number, 8),
                              (abi.indirect_handle, 2), (abi.indirect_grefs, 32)])
    assert all(raw[i] == 0 for i in range(len(raw)) if i not in used)
    dis = DiscardRequest(0xFFFF, U64, 0, U64, secure=True)
    raw = blkif.encode_request(dis, abi)
    used = _field_bytes(abi, [(0, 4), (abi.discard_id, 8), (abi.discard_nr_sectors, 8)])
    assert all(raw[i] == 0 for i in range(len(raw)) if i not in used)


# --- construction rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        ((1, 0, 8), "segment.last_sect"),
        ((1, 0, 255), "segment.last_sect"),
        ((1, 5, 4), "segment.first_sect"),
        ((1, -1, 4), "segment.first_sect"),
        ((2**32, 0, 0), "segment.gref"),
        ((-1, 0, 0), "segment.gref"),
        ((1.0, 0, 0), "segment.gref"),
        ((True, 0, 0), "segment.gref"),
    ],
)
def test_segment_rules(args: tuple, rule: str) -> None:
    with _raises(rule) as info:
        Segment(*args)
    assert info.value.rule == rule


def test_segment_sizes() -> None:
    seg = Segment(1, 2, 5)
    assert (seg.nr_sectors, seg.offset, seg.nr_bytes) == (4, 1024, 2048)
    assert Segment(1, 0, 7).nr_bytes == 4096


def test_request_sizes() -> None:
    req = Request(BLKIF_OP_READ, 0, 0, 0, (Segment(1, 0, 7), Segment(2, 1, 1)))
    assert (req.nr_segments, req.nr_sectors, req.nr_bytes) == (2, 9, 9 * 512)


SEG = Segment(1, 0, 7)


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"operation": BLKIF_OP_DISCARD}, "request.op"),
        ({"operation": BLKIF_OP_INDIRECT}, "request.op"),
        ({"operation": BLKIF_OP_RESERVED_1}, "request.op"),
        ({"operation": 7}, "request.op"),
        ({"handle": 0x10000}, "request.handle"),
        ({"id": 2**64}, "request.id"),
        ({"id": -1}, "request.id"),
        ({"sector_number": 2**64}, "request.sector_number"),
        ({"segments": [SEG]}, "request.segments"),
        ({"segments": ((1, 0, 7),)}, "request.segments"),
        ({"segments": (SEG,) * 12}, "request.nr_segments"),
        ({"segments": ()}, "request.nr_segments"),
        ({"operation": BLKIF_OP_WRITE, "segments": ()}, "request.nr_segments"),
        ({"operation": BLKIF_OP_FLUSH_DISKCACHE, "segments": (SEG,) * 12}, "request.nr_segments"),
    ],
)
def test_request_rules(kwargs: dict, rule: str) -> None:
    base = {"operation": BLKIF_OP_READ, "handle": 0, "id": 0, "sector_number": 0,
            "segments": (SEG,)}
    with _raises(rule):
        Request(**{**base, **kwargs})


def test_flush_and_barrier_may_be_empty_or_carry_data() -> None:
    for op in (BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
        assert Request(op, 0, 0, 0, ()).nr_segments == 0
        assert Request(op, 0, 0, 0, (SEG,) * 11).nr_bytes == 11 * 4096


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        ((0x10000, 0, 0, 0), "discard.handle"),
        ((0, 2**64, 0, 0), "discard.id"),
        ((0, 0, 2**64, 0), "discard.sector_number"),
        ((0, 0, 0, 2**64), "discard.nr_sectors"),
        ((0, 0, 2, U64), "discard.range"),
        ((0, 0, 0, 1, 1), "discard.secure"),
    ],
)
def test_discard_rules(args: tuple, rule: str) -> None:
    with _raises(rule):
        DiscardRequest(*args)


def test_discard_range_may_end_exactly_at_2_64() -> None:
    assert DiscardRequest(0, 0, 1, U64).nr_sectors == U64
    assert DiscardRequest(0, 0, 0, 0).operation == BLKIF_OP_DISCARD


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"indirect_op": BLKIF_OP_FLUSH_DISKCACHE}, "indirect.op"),
        ({"indirect_op": BLKIF_OP_INDIRECT}, "indirect.op"),
        ({"indirect_op": BLKIF_OP_DISCARD}, "indirect.op"),
        ({"handle": -1}, "indirect.handle"),
        ({"id": 2**64}, "indirect.id"),
        ({"sector_number": -5}, "indirect.sector_number"),
        ({"nr_segments": 0, "indirect_grefs": ()}, "indirect.nr_segments"),
        ({"nr_segments": 4097, "indirect_grefs": (1,) * 9}, "indirect.nr_segments"),
        ({"nr_segments": 513, "indirect_grefs": (1,)}, "indirect.grefs"),
        ({"nr_segments": 512, "indirect_grefs": (1, 2)}, "indirect.grefs"),
        ({"indirect_grefs": [1]}, "indirect.grefs"),
        ({"indirect_grefs": (2**32,)}, "indirect.grefs"),
    ],
)
def test_indirect_rules(kwargs: dict, rule: str) -> None:
    base = {"indirect_op": BLKIF_OP_READ, "handle": 0, "id": 0, "sector_number": 0,
            "nr_segments": 1, "indirect_grefs": (1,)}
    with _raises(rule):
        IndirectRequest(**{**base, **kwargs})


def test_indirect_nr_pages() -> None:
    assert IndirectRequest(BLKIF_OP_READ, 0, 0, 0, 512, (1,)).nr_pages == 1
    assert IndirectRequest(BLKIF_OP_READ, 0, 0, 0, 513, (1, 2)).nr_pages == 2
    assert IndirectRequest(BLKIF_OP_READ, 0, 0, 0, 1, (1,)).operation == BLKIF_OP_INDIRECT


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        ((2**64, 0, 0), "response.id"),
        ((0, 256, 0), "response.op"),
        ((0, -1, 0), "response.op"),
        ((0, 0, 2**15), "response.status"),
        ((0, 0, -(2**15) - 1), "response.status"),
    ],
)
def test_response_rules(args: tuple, rule: str) -> None:
    with _raises(rule):
        Response(*args)


def test_response_status_known() -> None:
    for status in (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP):
        assert Response(0, 0, status).status_known
    assert Response(0, 0, BLKIF_RSP_OKAY).ok and not Response(0, 0, BLKIF_RSP_ERROR).ok
    assert not Response(0, 0, -3).status_known
    assert not Response(0, 0, 1).status_known


@BOTH
def test_unknown_status_decodes(abi: Abi) -> None:
    raw = blkif.encode_response(Response(5, BLKIF_OP_READ, -32768), abi)
    rsp = blkif.decode_response(raw, abi)
    assert rsp.status == -32768 and not rsp.status_known


@BOTH
def test_backend_can_echo_an_unknown_op_but_a_frontend_rejects_it(abi: Abi) -> None:
    raw = blkif.encode_response(Response(5, 200, BLKIF_RSP_EOPNOTSUPP), abi)
    assert raw[abi.rsp_operation] == 200
    with _raises("response.op"):
        blkif.decode_response(raw, abi)
    raw = blkif.encode_response(Response(5, BLKIF_OP_RESERVED_1, BLKIF_RSP_EOPNOTSUPP), abi)
    with _raises("response.op"):
        blkif.decode_response(raw, abi)


def test_encoders_reject_other_types() -> None:
    with _raises("request.type"):
        blkif.encode_request(Response(0, 0, 0), X86_64)  # type: ignore[arg-type]
    with _raises("response.type"):
        blkif.encode_response(EXAMPLES[0], X86_64)  # type: ignore[arg-type]


# --- decode rules ------------------------------------------------------------------------------


def _raw(req: blkif.AnyRequest, abi: Abi) -> bytearray:
    return bytearray(blkif.encode_request(req, abi))


@BOTH
def test_decode_rejects_unknown_ops(abi: Abi) -> None:
    raw = _raw(EXAMPLES[0], abi)
    for op in (BLKIF_OP_RESERVED_1, 7, 0x80, 0xFF):
        raw[abi.req_operation] = op
        with _raises("request.op"):
            blkif.decode_request(raw, abi)
        # The header is still available so the backend can answer EOPNOTSUPP.
        assert blkif.decode_request_header(raw, abi) == blkif.RequestHeader(op, EXAMPLES[0].id)


@BOTH
def test_decode_nr_segments_rules(abi: Abi) -> None:
    raw = _raw(Request(BLKIF_OP_WRITE, 0, 0, 0, (SEG,) * 11), abi)
    for bad in (12, 0xFF):
        raw[abi.req_nr_segments] = bad
        with _raises("request.nr_segments"):
            blkif.decode_request(raw, abi)
    raw[abi.req_nr_segments] = 0
    with _raises("request.nr_segments"):
        blkif.decode_request(raw, abi)
    raw[abi.req_operation] = BLKIF_OP_FLUSH_DISKCACHE
    assert blkif.decode_request(raw, abi) == Request(BLKIF_OP_FLUSH_DISKCACHE, 0, 0, 0, ())


@BOTH
def test_decode_segment_rules(abi: Abi) -> None:
    raw = _raw(Request(BLKIF_OP_READ, 0, 0, 0, (SEG, SEG)), abi)
    second = abi.req_seg + abi.segment_size
    raw[second + abi.seg_last_sect] = 8
    with _raises("segment.last_sect"):
        blkif.decode_request(raw, abi)
    raw[second + abi.seg_last_sect] = 3
    raw[second + abi.seg_first_sect] = 4
    with _raises("segment.first_sect"):
        blkif.decode_request(raw, abi)


@BOTH
def test_decode_discard_rules(abi: Abi) -> None:
    raw = _raw(DiscardRequest(0, 0, 10, 10), abi)
    raw[abi.discard_flag] = 2
    with _raises("discard.flag"):
        blkif.decode_request(raw, abi)
    raw[abi.discard_flag] = 1
    assert blkif.decode_request(raw, abi) == DiscardRequest(0, 0, 10, 10, secure=True)
    struct.pack_into("<Q", raw, abi.discard_nr_sectors, U64)
    with _raises("discard.range"):
        blkif.decode_request(raw, abi)


@BOTH
def test_decode_indirect_rules(abi: Abi) -> None:
    raw = _raw(IndirectRequest(BLKIF_OP_WRITE, 0, 0, 0, 1, (5,)), abi)
    for op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_INDIRECT, 9):
        raw[abi.indirect_indirect_op] = op
        with _raises("indirect.op"):
            blkif.decode_request(raw, abi)
    raw[abi.indirect_indirect_op] = BLKIF_OP_READ
    for bad in (0, 4097, 0xFFFF):
        struct.pack_into("<H", raw, abi.indirect_nr_segments, bad)
        with _raises("indirect.nr_segments"):
            blkif.decode_request(raw, abi)
    struct.pack_into("<H", raw, abi.indirect_nr_segments, 4096)
    assert blkif.decode_request(raw, abi).indirect_grefs == (5, 0, 0, 0, 0, 0, 0, 0)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=140), op=st.integers(0, 7), abi=abi_st)
def test_decode_arbitrary_bytes_only_raises_blkif_error(data: bytes, op: int, abi: Abi) -> None:
    if data:  # mostly plausible operations, so the per-kind rules are reached
        data = bytes([op]) + data[1:]
    for decode in (blkif.decode_request, blkif.decode_response):
        try:
            decoded = decode(data, abi)
        except BlkifError as err:
            assert err.rule and str(err).startswith(err.rule + ": ")
        else:
            # Anything accepted re-encodes to the same meaning.
            is_request = decode is blkif.decode_request
            encode = blkif.encode_request if is_request else blkif.encode_response
            assert decode(encode(decoded, abi), abi) == decoded


# --- indirect pages ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(segs=st.lists(segments_st, min_size=1, max_size=1100))
def test_indirect_pages_round_trip(segs: list[Segment]) -> None:
    pages = blkif.encode_indirect_pages(segs)
    assert len(pages) == -(-len(segs) // 512)
    assert all(len(p) == 4096 for p in pages)
    assert blkif.decode_indirect_segments(pages, len(segs)) == tuple(segs)
    # Bytes after the last segment are zero.
    tail = (len(segs) % 512) * 8
    if tail:
        assert pages[-1][tail:] == bytes(4096 - tail)


def test_indirect_pages_full_size() -> None:
    segs = [Segment(i, 0, 7) for i in range(4096)]
    pages = blkif.encode_indirect_pages(segs)
    assert len(pages) == blkif.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
    assert blkif.decode_indirect_segments(pages, 4096)[4095] == Segment(4095, 0, 7)
    # Fewer segments than the pages hold: only the first ones are read.
    assert blkif.decode_indirect_segments(pages, 600) == tuple(segs[:600])


def test_indirect_page_layout() -> None:
    page = blkif.encode_indirect_pages([Segment(0x01020304, 2, 6), Segment(9, 0, 0)])[0]
    assert page[:16] == bytes([4, 3, 2, 1, 2, 6, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0])


def test_indirect_encode_rules() -> None:
    with _raises("indirect.nr_segments"):
        blkif.encode_indirect_pages([])
    with _raises("indirect.nr_segments"):
        blkif.encode_indirect_pages([SEG] * 4097)
    with _raises("indirect.segments"):
        blkif.encode_indirect_pages([SEG, (1, 0, 7)])  # type: ignore[list-item]


def test_indirect_decode_rules() -> None:
    pages = blkif.encode_indirect_pages([SEG] * 600)
    with _raises("indirect.nr_segments"):
        blkif.decode_indirect_segments(pages, 0)
    with _raises("indirect.nr_segments"):
        blkif.decode_indirect_segments(pages * 5, 4097)
    with _raises("indirect.pages"):
        blkif.decode_indirect_segments(pages[:1], 600)
    with _raises("indirect.page_length"):
        blkif.decode_indirect_segments([pages[0], pages[1][: 88 * 8 - 1]], 600)
    # A page exactly as long as its segments is enough (and a memoryview works).
    exact = [memoryview(pages[0]), pages[1][: 88 * 8]]
    assert len(blkif.decode_indirect_segments(exact, 600)) == 600
    bad = bytearray(pages[1])
    bad[5 * 8 + 5] = 8  # segment 517: last_sect 8
    snapshot = bytes(bad)
    with _raises("segment.last_sect"):
        blkif.decode_indirect_segments([pages[0], bad], 600)
    assert bytes(bad) == snapshot  # decoding never writes to the page
    bad[5 * 8 + 4], bad[5 * 8 + 5] = 7, 6
    with _raises("segment.first_sect"):
        blkif.decode_indirect_segments([pages[0], bad], 600)
    # A bad segment past nr_segments is not read.
    assert len(blkif.decode_indirect_segments([pages[0], bad], 517)) == 517
