"""Tests of xentools.core.ring: sizing, the shared header, front/back exchange, wrap-around
at 2**32, overflow checks, notification decisions and where the full barrier is called."""

from __future__ import annotations

import dataclasses
import mmap
import struct
import subprocess
import sys

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from xentools.core import blkif
from xentools.core.errors import ProtocolError, RingError
from xentools.core.ring import (
    RING_HEADER_SIZE,
    BackRing,
    FrontRing,
    SharedRing,
    ring_entries,
)

M = 2**32


def _raises(rule: str):
    return pytest.raises(RingError, match=f"^{rule.replace('.', '[.]')}: ")


class Barrier:
    """A full_barrier that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def make_ring(
    order: int = 0, entry_size: int = blkif.X86_64.entry_size
) -> tuple[bytearray, SharedRing]:
    buf = bytearray(4096 << order)
    return buf, SharedRing(memoryview(buf), entry_size, ring_entries(order, entry_size))


def attach_at(shared: SharedRing, index: int, barrier) -> tuple[FrontRing, BackRing]:
    """Both halves attached at `index`, as after `index` requests were answered."""
    shared.init()
    shared.req_prod = shared.rsp_prod = index
    shared.req_event = shared.rsp_event = index + 1
    return FrontRing(shared, barrier, index), BackRing(shared, barrier, index)


# --- sizing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=lambda a: a.name)
def test_blkif_ring_sizes(abi: blkif.Abi) -> None:
    assert [ring_entries(order, abi.entry_size) for order in range(5)] == [32, 64, 128, 256, 512]


def test_ring_entries_is_the_largest_power_of_two_that_fits() -> None:
    for order in range(9):
        for entry_size in (1, 7, 16, 64, 100, 108, 112, 1000, 4032):
            n = ring_entries(order, entry_size)
            assert n & (n - 1) == 0
            assert RING_HEADER_SIZE + n * entry_size <= 4096 << order
            assert RING_HEADER_SIZE + 2 * n * entry_size > 4096 << order


@pytest.mark.parametrize(("order", "entry_size", "rule"), [
    (-1, 112, "ring.order"), (9, 112, "ring.order"), (1.0, 112, "ring.order"),
    (0, 0, "ring.entry_size"), (0, -4, "ring.entry_size"), (0, 4033, "ring.entry_size"),
])
def test_ring_entries_rules(order, entry_size, rule: str) -> None:
    with _raises(rule):
        ring_entries(order, entry_size)


# --- the shared ring ------------------------------------------------------------------------


def test_init_sets_prods_events_and_zero_padding() -> None:
    buf, shared = make_ring()
    buf[:] = b"\xee" * len(buf)
    shared.init()
    assert struct.unpack_from("<4I", buf, 0) == (0, 1, 0, 1)
    assert buf[16:64] == bytes(48)
    assert buf[64:] == b"\xee" * (len(buf) - 64)  # slots are not the header's business
    assert (shared.req_prod, shared.req_event, shared.rsp_prod, shared.rsp_event) == (0, 1, 0, 1)


def test_header_fields_are_u32_at_fixed_offsets() -> None:
    buf, shared = make_ring()
    shared.req_prod, shared.req_event, shared.rsp_prod, shared.rsp_event = 1, 2, 3, M + 4
    assert struct.unpack_from("<4I", buf, 0) == (1, 2, 3, 4)  # stored mod 2**32
    struct.pack_into("<I", buf, 8, M - 1)
    assert shared.rsp_prod == M - 1


def test_slots_wrap() -> None:
    buf, shared = make_ring(entry_size=blkif.X86_32.entry_size)
    assert shared.slot_offset(0) == 64
    assert shared.slot_offset(31) == 64 + 31 * 108
    assert shared.slot_offset(32) == 64
    assert shared.slot_offset(M - 1) == 64 + 31 * 108
    shared.write_slot(M - 1, b"abc")
    assert bytes(shared.slot(31)[:3]) == b"abc"
    assert len(shared.slot(5)) == 108
    copy = shared.read_slot(31)
    buf[64 + 31 * 108] = ord("z")
    assert copy[:3] == b"abc"  # read_slot is a private copy
    assert bytes(shared.slot(31)[:3]) == b"zbc"  # slot is the shared memory itself


def test_write_slot_leaves_the_rest_and_rejects_oversize() -> None:
    buf, shared = make_ring()
    shared.write_slot(2, b"\x01" * 112)
    shared.write_slot(2, b"\x02" * 16)
    assert shared.read_slot(2) == b"\x02" * 16 + b"\x01" * 96
    with _raises("ring.entry_length"):
        shared.write_slot(0, bytes(113))


def test_shared_ring_rules() -> None:
    with _raises("ring.buffer"):
        SharedRing(memoryview(bytes(4096)), 112, 32)  # read-only
    with _raises("ring.buffer"):
        SharedRing(memoryview(bytearray(64 + 32 * 112 - 1)), 112, 32)
    with _raises("ring.buffer"):
        SharedRing(memoryview(bytearray(8192))[::2], 112, 32)  # not contiguous
    with _raises("ring.size"):
        SharedRing(memoryview(bytearray(4096)), 112, 24)
    with _raises("ring.size"):
        SharedRing(memoryview(bytearray(4096)), 112, 0)
    with _raises("ring.entry_size"):
        SharedRing(memoryview(bytearray(4096)), 0, 32)
    assert issubclass(RingError, ProtocolError)
    # A bytearray and a multi-byte memoryview are accepted as the same bytes.
    SharedRing(bytearray(4096), 112, 32).req_prod = 3
    words = memoryview(bytearray(4096)).cast("I")
    SharedRing(words, 112, 32).rsp_prod = 7
    assert words[2] == 7


# --- exchange -------------------------------------------------------------------------------


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=lambda a: a.name)
@pytest.mark.parametrize("order", range(5))
def test_front_and_back_exchange_blkif_messages(abi: blkif.Abi, order: int) -> None:
    buf = bytearray(4096 << order)
    size = ring_entries(order, abi.entry_size)
    barrier = Barrier()
    front = FrontRing.create(SharedRing(memoryview(buf), abi.entry_size, size), barrier)
    back = BackRing(SharedRing(memoryview(buf), abi.entry_size, size), barrier)
    assert front.size == back.size == size
    sent = []
    for round_ in range(3):  # three rounds so indices pass the ring size
        assert back.final_check_for_requests() is False
        for i in range(size):
            req = blkif.Request(blkif.BLKIF_OP_WRITE, 51712, round_ * size + i, i,
                                (blkif.Segment(i, 0, 7),))
            front.put_request(blkif.encode_request(req, abi))
            sent.append(req)
        assert front.full() and front.free_requests() == 0
        with _raises("ring.full"):
            front.put_request(b"")
        assert front.push_requests_and_check_notify() is True  # backend armed req_event
        assert back.unconsumed_requests() == size
        for _ in range(size):
            req = blkif.decode_request(back.get_request(), abi)
            assert req == sent[req.id]
            back.put_response(blkif.encode_response(blkif.Response(req.id, req.operation, 0), abi))
        assert front.final_check_for_responses() is False  # nothing published yet
        assert back.push_responses_and_check_notify() is True  # frontend armed rsp_event
        count = front.unconsumed_responses()
        got = [blkif.decode_response(front.get_response(), abi) for _ in range(count)]
        assert [r.id for r in got] == [r.id for r in sent[-size:]]
        assert front.free_requests() == size


@pytest.mark.parametrize("start", [M - 5, M - 32, M - 33])
def test_exchange_across_the_index_wrap(start: int) -> None:
    _, shared = make_ring()
    barrier = Barrier()
    front, back = attach_at(shared, start, barrier)
    ids = iter(range(10**6))
    for _ in range(4):
        batch = [next(ids) for _ in range(front.free_requests())]
        for i in batch:
            front.put_request(i.to_bytes(4, "little"))
        front.push_requests_and_check_notify()
        assert back.unconsumed_requests() == 32
        for i in batch:
            assert int.from_bytes(back.get_request()[:4], "little") == i
            back.put_response((i + 7).to_bytes(4, "little"))
        back.push_responses_and_check_notify()
        assert front.unconsumed_responses() == 32
        answers = [int.from_bytes(front.get_response()[:4], "little") for _ in batch]
        assert answers == [i + 7 for i in batch]
    assert front.req_prod_pvt == front.rsp_cons == (start + 128) % M < start
    assert shared.req_prod == shared.rsp_prod == (start + 128) % M


def test_fresh_ring_first_push_notifies_and_batches_do_not() -> None:
    _, shared = make_ring()
    front = FrontRing.create(shared, Barrier())
    back = BackRing(shared, Barrier())
    front.put_request(b"a")
    assert front.push_requests_and_check_notify() is True  # req_event starts at 1
    front.put_request(b"b")
    assert front.push_requests_and_check_notify() is False  # backend not asleep yet
    assert back.unconsumed_requests() == 2
    back.get_request(), back.get_request()
    assert back.final_check_for_requests() is False
    assert shared.req_event == 3
    front.put_request(b"c")
    assert front.push_requests_and_check_notify() is True


def test_push_with_nothing_new_does_not_notify() -> None:
    _, shared = make_ring()
    front = FrontRing.create(shared, Barrier())
    assert front.push_requests_and_check_notify() is False


def test_get_without_checked_entries_is_refused() -> None:
    _, shared = make_ring()
    front = FrontRing.create(shared, Barrier())
    back = BackRing(shared, Barrier())
    front.put_request(b"x")
    front.push_requests_and_check_notify()
    with _raises("ring.empty"):
        back.get_request()  # not counted by unconsumed_requests yet
    assert back.unconsumed_requests() == 1
    assert back.get_request()[:1] == b"x"
    with _raises("ring.empty"):
        back.get_request()
    with _raises("ring.empty"):
        front.get_response()
    back.put_response(b"y")
    with _raises("ring.no_request"):
        back.put_response(b"z")  # would overwrite a slot the frontend owns
    back.push_responses_and_check_notify()
    assert front.unconsumed_responses() == 1
    assert front.get_response()[:1] == b"y"
    with _raises("ring.empty"):
        front.get_response()


def test_backend_never_reads_a_slot_it_has_not_answered() -> None:
    """The min() of RING_HAS_UNCONSUMED_REQUESTS: req_cons - rsp_prod_pvt stays <= size."""
    _, shared = make_ring()
    front = FrontRing.create(shared, None)
    back = BackRing(shared, None)
    for i in range(32):
        front.put_request(bytes([i]))
    front.push_requests_and_check_notify()
    assert back.unconsumed_requests() == 32
    for _ in range(32):
        back.get_request()
    # A frontend that publishes more than it may (ignoring free_requests) is caught.
    shared.req_prod = 33
    with _raises("ring.req_overflow"):
        back.unconsumed_requests()
    back.put_response(b"r")
    # Now one response is written (but not published): one slot may be reused.
    assert back.unconsumed_requests() == 1


# --- overflow checks (XSA-376, RING_REQUEST_PROD_OVERFLOW) --------------------------------------


@pytest.mark.parametrize("start", [0, 17, M - 5, M - 1])
def test_response_overflow(start: int) -> None:
    _, shared = make_ring()
    front, _ = attach_at(shared, start, Barrier())
    shared.rsp_prod = start + 32
    assert front.unconsumed_responses() == 32  # exactly size: allowed
    shared.rsp_prod = start + 33
    with _raises("ring.rsp_overflow"):
        front.unconsumed_responses()
    with _raises("ring.rsp_overflow"):
        front.final_check_for_responses()
    shared.rsp_prod = start - 1  # moved backwards: a huge u32 difference
    with _raises("ring.rsp_overflow"):
        front.unconsumed_responses()


@pytest.mark.parametrize("start", [0, 17, M - 5, M - 1])
def test_request_overflow(start: int) -> None:
    _, shared = make_ring()
    _, back = attach_at(shared, start, Barrier())
    shared.req_prod = start + 32
    assert back.unconsumed_requests() == 32
    shared.req_prod = start + 33
    with _raises("ring.req_overflow"):
        back.unconsumed_requests()
    with _raises("ring.req_overflow"):
        back.final_check_for_requests()


def test_overflow_check_reads_prod_once() -> None:
    """A prod that changes between reads cannot pass the check and then be used larger."""

    class FlippingRing(SharedRing):
        reads = 0

        @property
        def rsp_prod(self) -> int:
            FlippingRing.reads += 1
            return 1 if FlippingRing.reads == 1 else 1000

    flipping = FlippingRing(memoryview(bytearray(4096)), 112, 32)
    front = FrontRing(flipping, None)
    assert front.unconsumed_responses() == 1
    assert FlippingRing.reads == 1
    front.get_response()
    with _raises("ring.empty"):
        front.get_response()  # bounded by the value that was checked


# --- full barrier placement ----------------------------------------------------------------------


def test_full_barrier_called_exactly_where_ring_h_has_xen_mb() -> None:
    _, shared = make_ring()
    fb, bb = Barrier(), Barrier()
    front = FrontRing.create(shared, fb)
    back = BackRing(shared, bb)
    front.put_request(b"1")
    assert fb.calls == 0  # writing a slot needs none
    front.push_requests_and_check_notify()
    assert fb.calls == 1
    assert back.final_check_for_requests() is True  # work found at once: no barrier
    assert bb.calls == 0
    back.unconsumed_requests()
    back.get_request()
    assert bb.calls == 0
    assert back.final_check_for_requests() is False  # armed the event: one barrier
    assert bb.calls == 1
    back.put_response(b"2")
    back.push_responses_and_check_notify()
    assert bb.calls == 2
    assert front.unconsumed_responses() == 1 and fb.calls == 1
    front.get_response()
    assert front.final_check_for_responses() is False
    assert fb.calls == 2
    assert front.free_requests() == 32 and fb.calls == 2


def test_barrier_runs_between_publish_and_event_read() -> None:
    _, shared = make_ring()
    seen = []
    front = FrontRing.create(shared, lambda: seen.append(shared.req_prod))
    front.put_request(b"a")
    front.put_request(b"b")
    front.push_requests_and_check_notify()
    assert seen == [2]  # the new producer index was already published


def test_without_full_barrier_push_always_notifies() -> None:
    _, shared = make_ring()
    front = FrontRing.create(shared, None)
    back = BackRing(shared, None)
    shared.req_event = 1000  # backend says "do not bother me"
    shared.rsp_event = 1000
    front.put_request(b"a")
    assert front.push_requests_and_check_notify() is True
    assert front.push_requests_and_check_notify() is True
    assert back.unconsumed_requests() == 1
    back.get_request()
    back.put_response(b"b")
    assert back.push_responses_and_check_notify() is True
    # final check still arms the event and re-checks.
    assert front.final_check_for_responses() is True
    front.get_response()
    assert front.final_check_for_responses() is False
    assert shared.rsp_event == 2


def test_final_check_sees_work_published_while_arming() -> None:
    """The re-check after arming the event catches a request published in between."""
    _, shared = make_ring()
    front = FrontRing.create(shared, None)

    def peer_publishes() -> None:
        front.put_request(b"late")
        front.push_requests_and_check_notify()

    back = BackRing(shared, peer_publishes)
    assert back.final_check_for_requests() is True
    assert shared.req_event == 1
    assert back.get_request()[:4] == b"late"


# --- wrap-around property tests against a reference model ---------------------------------------


def notify_model(old: int, new: int, event: int) -> bool:
    """Independent statement of the hold-off rule: notify iff the event index is one of
    the indices just published, old+1 .. new (counted mod 2**32)."""
    return any((old + k) % M == event % M for k in range(1, (new - old) % M + 1))


def notify_formula(old: int, new: int, event: int) -> bool:
    """ring.h: (RING_IDX)(new - event) < (RING_IDX)(new - old)."""
    return (new - event) % M < (new - old) % M


@settings(max_examples=300, deadline=None)
@given(old=st.integers(0, M - 1), step=st.integers(0, 40), back=st.integers(-50, 50))
def test_notify_formula_equals_model(old: int, step: int, back: int) -> None:
    new = (old + step) % M
    event = (old + back) % M
    assert notify_formula(old, new, event) == notify_model(old, new, event)
    _, shared = make_ring()
    front = FrontRing(shared, Barrier(), old)
    shared.req_prod = old
    shared.req_event = event
    front.req_prod_pvt = new
    assert front.push_requests_and_check_notify() == notify_model(old, new, event)


@dataclasses.dataclass
class Model:
    """Unwrapped (Python int) indices; the ring must hold them mod 2**32."""

    size: int
    req_prod_pvt: int
    req_prod: int
    req_cons: int
    rsp_prod_pvt: int
    rsp_prod: int
    rsp_cons: int
    req_event: int
    rsp_event: int
    next_payload: int = 0


actions = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["put", "consume", "respond", "take"]), st.integers(1, 40)),
        st.tuples(
            st.sampled_from(["push_req", "push_rsp", "back_check", "front_check"]), st.just(0)
        ),
        st.tuples(st.just("cycle"), st.integers(1, 40)),
    ),
    max_size=60,
)


@settings(max_examples=120, deadline=None)
@given(start=st.one_of(st.integers(M - 24, M - 1), st.integers(M - 24, M - 1),
                       st.integers(0, M - 1)),
       script=actions,
       with_barrier=st.booleans(), order=st.integers(0, 1))
def test_exchange_matches_model_across_wrap(
    start: int, script, with_barrier: bool, order: int
) -> None:
    _, shared = make_ring(order)
    fb, bb = Barrier(), Barrier()
    front, back = attach_at(shared, start, fb if with_barrier else None)
    back.full_barrier = bb if with_barrier else None
    size = front.size
    m = Model(size, start, start, start, start, start, start, start + 1, start + 1)
    expected_fb = expected_bb = 0
    payload_of = {}

    expanded = []
    for action, n in script:  # "cycle": one whole round trip of n requests
        steps = ["put", "push_req", "consume", "respond", "push_rsp", "take"]
        expanded += [(step, n) for step in steps] if action == "cycle" else [(action, n)]

    for action, n in expanded:
        if action == "put":
            for _ in range(min(n, size - (m.req_prod_pvt - m.rsp_cons))):
                front.put_request(m.next_payload.to_bytes(8, "little"))
                payload_of[m.req_prod_pvt] = m.next_payload
                m.next_payload += 1
                m.req_prod_pvt += 1
            if m.req_prod_pvt - m.rsp_cons == size:
                with _raises("ring.full"):
                    front.put_request(b"")
        elif action == "push_req":
            want = notify_model(m.req_prod, m.req_prod_pvt, m.req_event) if with_barrier else True
            if with_barrier:
                assert want == notify_formula(m.req_prod, m.req_prod_pvt, m.req_event)
                expected_fb += 1
            assert front.push_requests_and_check_notify() is want
            m.req_prod = m.req_prod_pvt
        elif action == "consume":
            avail = min(m.req_prod - m.req_cons, size - (m.req_cons - m.rsp_prod_pvt))
            assert back.unconsumed_requests() == avail
            for _ in range(min(n, avail)):
                got = int.from_bytes(back.get_request()[:8], "little")
                assert got == payload_of[m.req_cons]
                m.req_cons += 1
        elif action == "respond":
            for _ in range(min(n, m.req_cons - m.rsp_prod_pvt)):
                back.put_response((payload_of[m.rsp_prod_pvt] ^ 0xFF).to_bytes(8, "little"))
                m.rsp_prod_pvt += 1
        elif action == "push_rsp":
            want = notify_model(m.rsp_prod, m.rsp_prod_pvt, m.rsp_event) if with_barrier else True
            if with_barrier:
                expected_bb += 1
            assert back.push_responses_and_check_notify() is want
            m.rsp_prod = m.rsp_prod_pvt
        elif action == "take":
            avail = m.rsp_prod - m.rsp_cons
            assert front.unconsumed_responses() == avail
            for _ in range(min(n, avail)):
                got = int.from_bytes(front.get_response()[:8], "little")
                assert got == payload_of[m.rsp_cons] ^ 0xFF
                m.rsp_cons += 1
        elif action == "back_check":
            avail = min(m.req_prod - m.req_cons, size - (m.req_cons - m.rsp_prod_pvt))
            if avail == 0:
                m.req_event = m.req_cons + 1
                expected_bb += with_barrier
            assert back.final_check_for_requests() is (avail > 0)
        elif action == "front_check":
            avail = m.rsp_prod - m.rsp_cons
            if avail == 0:
                m.rsp_event = m.rsp_cons + 1
                expected_fb += with_barrier
            assert front.final_check_for_responses() is (avail > 0)

        assert front.free_requests() == size - (m.req_prod_pvt - m.rsp_cons)
        assert (front.req_prod_pvt, front.rsp_cons) == (m.req_prod_pvt % M, m.rsp_cons % M)
        assert (back.rsp_prod_pvt, back.req_cons) == (m.rsp_prod_pvt % M, m.req_cons % M)
        assert (shared.req_prod, shared.rsp_prod) == (m.req_prod % M, m.rsp_prod % M)
        assert (shared.req_event, shared.rsp_event) == (m.req_event % M, m.rsp_event % M)
        assert (fb.calls, bb.calls) == (expected_fb, expected_bb)
    # Coverage note (see --hypothesis-show-statistics): how often the indices wrapped.
    event(f"req wrapped={m.req_prod_pvt >= M > start}, rsp wrapped={m.rsp_cons >= M > start}")


# --- indices shared with another process ---------------------------------------------------

_WRITER = """
import mmap, sys
from xentools.core.ring import SharedRing
with open(sys.argv[1], "r+b") as f:
    ring = SharedRing(memoryview(mmap.mmap(f.fileno(), 4096)), 112, 32)
    for value in range(1 << 16, 1 << 16 | 400000):
        ring.rsp_prod = value
"""


def test_indices_are_never_seen_half_written_by_another_process(tmp_path):
    """A peer process publishes rsp_prod as fast as it can; every value read here is one it
    wrote, in order: never 0 (struct.pack_into zero-fills first), never backwards."""
    path = tmp_path / "ring"
    path.write_bytes(bytes(4096))
    with open(path, "r+b") as f:
        shared = mmap.mmap(f.fileno(), 4096)
    ring = SharedRing(memoryview(shared), 112, 32)
    ring.rsp_prod = 1 << 16
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)])
    last = 1 << 16
    reads = 0
    while writer.poll() is None:
        for _ in range(2000):
            value = ring.rsp_prod
            assert last <= value < (1 << 16 | 400000), value
            last = value
            reads += 1
    assert writer.wait() == 0 and reads > 10000
    assert ring.rsp_prod == (1 << 16 | 400000) - 1
    ring.release()
