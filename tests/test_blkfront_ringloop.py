"""blkfront's compiled fill and reap against its pure-Python path: the same batches and the
same random and hostile responses must give the same ring slots, the same completions, the
same data (the caller's buffers and the granted pages) and the same Violation rule.

Two BlkfrontQueues over plain memory (the ring and the lanes' pages: the fill and reap touch
nothing else), each with the same BatchLanes (blkfront_batch): one through the compiled
fill and reap (xentools/devices/blkfront_ringloop.c, built by `make`), one told not to.
Each state: a batch of READs or WRITEs of random lengths (direct and INDIRECT) on free lanes
(a quarter of the READ batches into the lanes' registered buffers, one length for all),
sometimes a plain request of the future API beside them, then the "backend" writes the
same responses into both rings: valid ones (OKAY, ERROR, EOPNOTSUPP, the inner op or
INDIRECT for an indirect request), and hostile ones (an id no request carries, the id of a
lane already answered or idle, a wrong operation, a status blkif does not know, rsp_prod
past the ring) and random bytes in the pages a read shares. take_responses then runs on
both; everything it returns and leaves behind is compared. After a violation both sides
start again (a device would fail). Both ABIs, 512- and 4096-byte sectors: 10,000 states.
read_many's compiled stream (xt_front_stream, in its one-round mode) is held against its
Python loop the same way: 4,000 more states.
"""

from __future__ import annotations

import os
import random
import re
import types
from pathlib import Path

import pytest

from xentools.core import blkif
from xentools.core.blkif import BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, PAGE_SIZE, codec_for
from xentools.core.ring import RING_HEADER_SIZE
from xentools.devices import blkfront_batch
from xentools.devices.blkfront_batch import BatchLanes, Lane, flayout_of
from xentools.devices.blkfront_queue import BlkfrontQueue, InFlight

STATES = 2500  # per case: 10,000 in all
LANES = 6
DATA_PAGES = 13  # per lane: up to 52 KiB, INDIRECT past 11 pages
SEED = int(os.environ.get("RINGLOOP_SEED", "20261127"))
_M64 = (1 << 64) - 1


def compiled():  # type: ignore[no-untyped-def]
    """The extension module, whatever XENTOOLS_RINGLOOP says (that variable picks the path a
    device takes; this test runs both paths side by side), or None where it is not built."""
    try:
        from xentools.devices import _blkback_ringloop  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _blkback_ringloop


class Side:
    """One queue (ring order 0) and its lanes over plain memory."""

    def __init__(self, abi: blkif.Abi, unit: int, use_compiled: bool, seed: int) -> None:
        codec = codec_for(abi)
        self.codec = codec
        self.ring_mem = bytearray(PAGE_SIZE)
        self.queue = BlkfrontQueue(0, codec, types.SimpleNamespace(buf=memoryview(self.ring_mem), refs=(1,)), 0, None, 3)
        self.pool = bytearray(random.Random(seed).randbytes(LANES * (DATA_PAGES + 1) * PAGE_SIZE))
        view = memoryview(self.pool)
        lanes = []
        for index in range(LANES):
            base = index * (DATA_PAGES + 1) * PAGE_SIZE
            refs = [1000 + index * 32 + page for page in range(DATA_PAGES + 1)]
            lanes.append(Lane(
                data=view[base : base + DATA_PAGES * PAGE_SIZE],
                segments=codec.pack_segments([(ref, 0, PAGE_SIZE // unit - 1) for ref in refs[:DATA_PAGES]]),
                indirect=view[base + DATA_PAGES * PAGE_SIZE : base + (DATA_PAGES + 1) * PAGE_SIZE],
                indirect_refs=(refs[DATA_PAGES],),
            ))
        self.lanes = BatchLanes(self.queue, lanes, handle=0x1234, unit=unit,
                                module=compiled() if use_compiled else None)
        assert self.lanes.compiled == use_compiled
        self.rsp_prod = 0  # the backend's private producer index
        self.dests: dict[int, bytearray] = {}
        # Registered read buffers (BatchIO.register_buffers), the same bytes on both sides.
        self.registered = [bytearray(random.Random(seed + 1 + i).randbytes(DATA_PAGES * PAGE_SIZE))
                           for i in range(LANES)]
        self.lanes.register(self.registered)

    def fill_registered(self, sectors: list[int], nbytes: int) -> list[int]:
        return self.lanes.fill_registered(sectors, nbytes, 123.0)

    def fill(self, op: int, requests: list[tuple[int, int, bytes | None]]) -> list[int]:
        items = []
        for sector, nbytes, data in requests:
            if op == BLKIF_OP_WRITE:
                items.append((sector, nbytes, data))
            elif data is None:
                items.append((sector, nbytes, None))
            else:
                buf = bytearray(data)  # the destination starts with these bytes
                items.append((sector, nbytes, buf))
        used = self.lanes.fill(op, items, 123.0)
        for lane, (_, _, buf) in zip(used, items):
            if op == BLKIF_OP_READ and buf is not None:
                self.dests[lane] = buf
        return used

    def plain(self, op: int) -> InFlight | None:
        """A request of the future API (its response is the Python path's)."""
        entry = InFlight()
        if not self.queue.claim_slot(entry):
            return None
        entry.op = entry.rsp_op = op
        self.queue.put(self.codec.rw_request(op, 0, entry.id, 0, b"", 0))
        return entry

    def respond(self, responses: list[bytes], overflow: int) -> None:
        shared = self.queue.ring.shared
        for raw in responses:
            shared.write_slot(self.rsp_prod, raw)
            self.rsp_prod += 1
        shared.rsp_prod = self.rsp_prod + overflow

    def outcome(self) -> dict:
        self.queue.push()
        done, violation = self.queue.take_responses()
        completed = self.lanes.take_completed()
        dests = {lane: bytes(self.dests.pop(lane)) for lane, _ in completed if lane in self.dests}
        return {
            "done": [(entry.slot, entry.id, status) for entry, status in done],
            "violation": None if violation is None else (violation.rule, violation.detail),
            "completed": completed,
            "dests": dests,
            "pool": self.pool,  # compared at once, before anything changes them
            "ring": self.ring_mem,
            "rsp_cons": self.queue.ring.rsp_cons,
            "in_flight": self.queue.in_flight,
            "free_slots": sorted(self.queue.free_slots),
            "settled": self.queue.settled,
            "expected": [self.lanes.expected(lane) for lane in range(LANES)],
            "views": [bytes(self.lanes.data(lane)) for lane, _ in completed],
            "registered": b"".join(self.registered),
        }


class Backend:
    """The responses of one state: valid, hostile or random, for both sides alike."""

    def __init__(self, rng: random.Random, codec: blkif.SlotCodec, size: int) -> None:
        self.rng = rng
        self.codec = codec
        self.size = size
        self.answered: list[int] = []  # ids answered before (stale)

    def response(self, req_id: int, wire: int, rsp_op: int) -> bytes:
        rng = self.rng
        status = rng.choice((blkif.BLKIF_RSP_OKAY,) * 6 + (blkif.BLKIF_RSP_ERROR, blkif.BLKIF_RSP_EOPNOTSUPP))
        op = BLKIF_OP_INDIRECT if wire == BLKIF_OP_INDIRECT and rng.random() < 0.3 else rsp_op
        pick = rng.random()
        if pick < 0.02:
            req_id = rng.getrandbits(64)
        elif pick < 0.03 and self.answered:
            req_id = rng.choice(self.answered)  # a stale or duplicated response
        elif pick < 0.04:
            req_id = (req_id + self.size) & _M64  # the right slot, another sequence
        elif pick < 0.05:
            op = rng.choice((BLKIF_OP_WRITE if rsp_op == BLKIF_OP_READ else BLKIF_OP_READ, blkif.BLKIF_OP_FLUSH_DISKCACHE,
                             BLKIF_OP_INDIRECT, 200))
        elif pick < 0.06:
            status = rng.choice((1, 2, -3, 0x7FFF, -0x8000))
        self.answered.append(req_id)
        raw = bytearray(self.codec.response_bytes(req_id, op, status))
        if rng.random() < 0.2:  # the padding is the backend's business
            at = self.codec.abi.rsp_status + 2
            raw[at:] = rng.randbytes(len(raw) - at)
        return bytes(raw)


def _same_outcome(got_fast: dict, got_slow: dict, states: int) -> None:
    """The compiled side's outcome equals the Python side's, key by key (bytes: the first
    differing byte is named)."""
    for key in got_fast:
        a, b = got_fast[key], got_slow[key]
        if isinstance(a, (bytes, bytearray)) and a != b:
            at = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
            raise AssertionError(f"state {states}: {key} differs from byte {at}")
        assert a == b, (states, key, a, b)


def _backend_acts(rng: random.Random, fast: Side, slow: Side, backend: Backend, pending: list,
                  *, plain: float, overflow: float) -> tuple[list, int]:
    """The backend's turn on both sides alike: perhaps a plain request (probability `plain`),
    then answers to some of what waits, in any order, perhaps with garbage, and perhaps an
    overflowing rsp_prod (probability `overflow`). Returns (what still waits, the overflow)."""
    if rng.random() < plain:
        plain_op = rng.choice((blkif.BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ))
        a, b = fast.plain(plain_op), slow.plain(plain_op)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.id == b.id
            pending.append((a.id, plain_op, plain_op))
    rng.shuffle(pending)
    take = rng.randrange(0, len(pending) + 1)
    answers, pending = pending[:take], pending[take:]
    responses = [backend.response(*answer) for answer in answers]
    if rng.random() < 0.01:
        responses.append(rng.randbytes(fast.codec.abi.response_size))
    over = 0
    if rng.random() < overflow:
        over = rng.choice((fast.queue.size + 1, (1 << 32) - 1, rng.randrange(1 << 32)))
    fast.respond(responses, over)
    slow.respond(responses, over)
    return pending, over


def _case(abi: blkif.Abi, unit: int, seed: int) -> tuple[int, int, int]:
    """(states, violations, responses the compiled reap took)."""
    rng = random.Random(seed)
    codec = codec_for(abi)
    states = violations = compiled_reaps = 0
    while states < STATES:
        pool_seed = rng.getrandbits(32)
        fast, slow = Side(abi, unit, True, pool_seed), Side(abi, unit, False, pool_seed)
        backend = Backend(rng, codec, fast.queue.size)
        pending: list[tuple[int, int, int]] = []  # (id, wire op, response op) awaiting a response
        while states < STATES:
            states += 1
            op = rng.choice((BLKIF_OP_READ, BLKIF_OP_WRITE))
            count = rng.randrange(0, len(fast.lanes.free) + 1)
            requests = []
            for _ in range(count):
                pages = rng.choice((1, 1, 2, 11, 12, DATA_PAGES))
                nbytes = rng.randrange(max(unit, (pages - 1) * PAGE_SIZE + unit), pages * PAGE_SIZE + 1, unit)
                sector = rng.randrange(1 << 40) if rng.random() < 0.9 else rng.getrandbits(64)
                if op == BLKIF_OP_WRITE:
                    data = rng.randbytes(nbytes)
                else:
                    data = None if rng.random() < 0.3 else rng.randbytes(nbytes)
                requests.append((sector, nbytes, data))
            if op == BLKIF_OP_READ and requests and rng.random() < 0.25:  # into registered buffers
                sectors = [sector for sector, _, _ in requests]
                used_fast = fast.fill_registered(sectors, requests[0][1])
                used_slow = slow.fill_registered(sectors, requests[0][1])
            else:
                used_fast = fast.fill(op, requests)
                used_slow = slow.fill(op, requests)
            assert used_fast == used_slow
            assert fast.ring_mem == slow.ring_mem, f"state {states}: the filled slots differ"
            assert fast.pool == slow.pool, f"state {states}: the granted pages differ after the fill"
            for lane in used_fast:
                req_id, wire, rsp_op, _ = fast.lanes.expected(lane)
                assert (req_id, wire, rsp_op) == slow.lanes.expected(lane)[:3]
                pending.append((req_id, wire, rsp_op))
                if op == BLKIF_OP_READ and rng.random() < 0.8:  # the backend's data
                    data = fast.lanes.lanes[lane].data
                    nbytes = fast.lanes.nbytes(lane)
                    noise = rng.randbytes(nbytes)
                    data[:nbytes] = noise
                    slow.lanes.lanes[lane].data[:nbytes] = noise
            pending, overflow = _backend_acts(rng, fast, slow, backend, pending, plain=0.2, overflow=0.01)
            got_fast, got_slow = fast.outcome(), slow.outcome()
            _same_outcome(got_fast, got_slow, states)
            if got_fast["violation"] is not None or overflow:
                violations += got_fast["violation"] is not None
                break
        compiled_reaps += fast.lanes.compiled_reaps
    return states, violations, compiled_reaps


@pytest.mark.parametrize(
    "abi,unit",
    [(blkif.X86_64, 512), (blkif.X86_64, 4096), (blkif.X86_32, 512), (blkif.X86_32, 4096)],
    ids=["x86_64-512", "x86_64-4096", "x86_32-512", "x86_32-4096"],
)
def test_compiled_fill_and_reap_answer_as_the_python_path(abi, unit, capsys) -> None:
    assert compiled() is not None, (
        "the compiled ring loop is not built: run `make venv` (it runs bindings/build_ringloop.py;"
        " needs gcc) or unset XENTOOLS_RINGLOOP=python"
    )
    states, violations, reaped = _case(abi, unit, SEED + unit + (abi is blkif.X86_32))
    with capsys.disabled():
        print(f"\nblkfront ringloop {abi.name} {unit}: {states} states, {violations} violations judged alike, "
              f"{reaped} responses taken by the compiled reap")
    assert states == STATES and violations > 20 and reaped > STATES // 2


def test_the_compiled_reap_takes_plain_responses_and_leaves_the_rest() -> None:
    """The compiled reap really runs (it completes valid responses itself) and stops at a
    response it must not judge, which the Python path then fails with its rule."""
    assert compiled() is not None, "the compiled ring loop is not built: run `make venv`"
    side = Side(blkif.X86_64, 512, True, 1)
    codec = side.codec
    used = side.fill(BLKIF_OP_READ, [(8, 4096, bytes(4096)), (16, 4096, None), (24, 4096, None)])
    side.lanes.lanes[used[0]].data[:4096] = b"\xab" * 4096
    ids = [side.lanes.expected(lane)[0] for lane in used]
    side.respond([codec.response_bytes(ids[0], BLKIF_OP_READ, 0), codec.response_bytes(ids[1], BLKIF_OP_READ, -1),
                  codec.response_bytes(ids[2], BLKIF_OP_WRITE, 0)], 0)
    out = side.outcome()
    assert side.lanes.compiled_reaps == 2
    assert out["completed"] == [(used[0], 0), (used[1], -1)]
    assert out["dests"][used[0]] == b"\xab" * 4096  # copied once into the caller's buffer
    # The lane's page is not zeroed between requests: it holds only what this backend wrote
    # (blkfront_batch's docstring: XSA-403 asks for zeroing before first sharing, and the
    # pool does it then and when the run goes back).
    assert bytes(side.lanes.lanes[used[0]].data[:4096]) == b"\xab" * 4096
    assert out["violation"][0] == "response.op"


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=["x86_64", "x86_32"])
def test_the_fill_and_reap_take_every_offset_from_the_one_codec(abi) -> None:
    """struct xt_flayout is filled from core/blkif.py's Abi by field name: the C code holds no
    layout of its own (its only numbers are ring.h's and blkif.h's constants)."""
    module = compiled()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    layout = flayout_of(module, abi)
    fields = [name for name, _ in module.ffi.typeof("struct xt_flayout").fields]
    assert len(fields) >= 20 and all(getattr(layout, name) == getattr(abi, name) for name in fields)
    devices = Path(__file__).resolve().parent.parent / "xentools" / "devices"
    source = (devices / "blkfront_ringloop.c").read_text() + (devices / "blkfront_ringloop.h").read_text()
    assert "struct blkif" not in source and "#include <xen" not in source
    defines = {name: int(value) for name, value in re.findall(r"#define XF_(\w+) (\d+)u?\b", source)}
    assert defines == {
        "PAGE": PAGE_SIZE, "HEADER": RING_HEADER_SIZE,
        "REQ_PROD": 0, "REQ_EVENT": 4, "RSP_PROD": 2 * 4, "RSP_EVENT": 3 * 4,  # ring.h: the four RING_IDX
        "MAX_SEGS": blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST,
        "MAX_INDIRECT_PAGES": blkif.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, "SLOT_MAX": 128,
        "OP_READ": BLKIF_OP_READ, "OP_WRITE": BLKIF_OP_WRITE, "OP_INDIRECT": BLKIF_OP_INDIRECT,
    }, defines
    assert defines["SLOT_MAX"] >= max(blkif.X86_64.entry_size, blkif.X86_32.entry_size)


# -- read_many: xt_front_stream's one round against the Python loop ------------------------

STREAM_STATES = 1000  # per case: 4,000 in all


def _stream_round(side: Side, st, compiled_round: bool) -> dict:
    """One round of read_many's loop on `side`: xt_front_stream with timeout 0 (fill, push,
    reap) then take_responses for what it leaves (it must leave nothing unless it stopped),
    or the Python loop's fill, push and take_responses. Then the completions go to `st`."""
    lanes, queue = side.lanes, side.queue
    stopped = True
    if compiled_round:
        flags = lanes.stream_compiled(st, 123.0, 0)
        lanes.settle_stream(st)
        # It stops at what is not plainly its own, and reaps nothing while no lane is busy.
        stopped = bool(flags & blkfront_batch.WAIT_STOP) or st.c.nfree == LANES
        assert not flags & (blkfront_batch.STREAM_REFUSED | blkfront_batch.STREAM_GIVE_WAY), flags
    else:
        lanes.stream_fill(st, 123.0)
        queue.push()
    cons = queue.ring.rsp_cons
    done, violation = queue.take_responses()
    if not stopped:  # the compiled round took every plain response there was
        assert queue.ring.rsp_cons == cons and not done and violation is None and not lanes.completed
    lanes.stream_take(st)
    free = [int(lane) for lane in st.c.free[0 : st.c.nfree]] if st.c is not None else list(lanes.free)
    return {
        "done": [(entry.slot, entry.id, status) for entry, status in done],
        "violation": None if violation is None else (violation.rule, violation.detail),
        "next": st.next, "count_done": st.done, "failed": st.failed,
        "free": free,
        "carrying": sorted((lane, st.index(lane)) for lane in range(LANES) if lane not in free),
        "expected": [lanes.expected(lane) for lane in range(LANES)],
        "ring": side.ring_mem, "pool": side.pool, "into": st.into.obj,
        "rsp_cons": queue.ring.rsp_cons, "req_prod_pvt": queue.ring.req_prod_pvt,
        "in_flight": queue.in_flight, "busy": lanes.busy, "free_slots": sorted(queue.free_slots),
    }


def _stream_case(abi: blkif.Abi, unit: int, seed: int) -> tuple[int, int, int, int]:
    """(states, violations, reads that failed, responses taken by the compiled stream)."""
    rng = random.Random(seed)
    codec = codec_for(abi)
    states = violations = failures = reaped = 0
    while states < STREAM_STATES:
        pool_seed = rng.getrandbits(32)
        fast, slow = Side(abi, unit, True, pool_seed), Side(abi, unit, False, pool_seed)
        backend = Backend(rng, codec, fast.queue.size)
        pages = rng.choice((1, 1, 2, 11, 12, DATA_PAGES))
        nbytes = rng.randrange(max(unit, (pages - 1) * PAGE_SIZE + unit), pages * PAGE_SIZE + 1, unit)
        count = rng.randrange(1, 40)
        sectors = [rng.randrange(1 << 40) if rng.random() < 0.9 else rng.getrandbits(64) for _ in range(count)]
        start = rng.randbytes(count * nbytes)
        st_fast = blkfront_batch.Stream(sectors, memoryview(bytearray(start)), nbytes, LANES)
        st_slow = blkfront_batch.Stream(sectors, memoryview(bytearray(start)), nbytes, LANES)
        fast.lanes.stream_begin(st_fast)
        seen: set[int] = set()
        pending: list[tuple[int, int, int]] = []
        while states < STREAM_STATES:
            states += 1
            if st_fast.c is not None and rng.random() < 0.02:
                fast.lanes.stream_leave(st_fast)  # it gave way: the Python loop goes on (compiled fill and reap)
            got_fast = _stream_round(fast, st_fast, st_fast.c is not None)
            got_slow = _stream_round(slow, st_slow, False)
            _same_outcome(got_fast, got_slow, states)
            if got_fast["violation"] is not None:
                violations += 1
                break
            if got_fast["busy"] == 0 and (st_fast.next == count or st_fast.failed is not None):
                failures += st_fast.failed is not None
                break
            # The requests filled in this round: the backend's data in their pages, then some answers.
            for lane in range(LANES):
                req_id, wire, rsp_op, _ = fast.lanes.expected(lane)
                if req_id >= 0 and req_id not in seen:
                    seen.add(req_id)
                    pending.append((req_id, wire, rsp_op))
                    if rng.random() < 0.8:
                        noise = rng.randbytes(nbytes)
                        fast.lanes.lanes[lane].data[:nbytes] = noise
                        slow.lanes.lanes[lane].data[:nbytes] = noise
            pending, _ = _backend_acts(rng, fast, slow, backend, pending, plain=0.1, overflow=0.005)
        reaped += fast.lanes.compiled_reaps
    return states, violations, failures, reaped


@pytest.mark.parametrize(
    "abi,unit",
    [(blkif.X86_64, 512), (blkif.X86_64, 4096), (blkif.X86_32, 512), (blkif.X86_32, 4096)],
    ids=["x86_64-512", "x86_64-4096", "x86_32-512", "x86_32-4096"],
)
def test_the_compiled_stream_answers_as_the_python_loop(abi, unit, capsys) -> None:
    """read_many's compiled stream (xt_front_stream, one round: fill, push, reap) against
    its Python loop (fill, push, take_responses) over the same random and hostile states:
    the same slots, ids, lanes, data in the caller's buffer, completions, first failed read
    and Violation; now and then the compiled side leaves the stream mid-way (give way) and
    goes on as the Python loop with the compiled fill and reap."""
    assert compiled() is not None, "the compiled ring loop is not built: run `make venv`"
    states, violations, failures, reaped = _stream_case(abi, unit, SEED * 3 + unit + (abi is blkif.X86_32))
    with capsys.disabled():
        print(f"\nblkfront stream {abi.name} {unit}: {states} states, {violations} violations and {failures} "
              f"failed reads judged alike, {reaped} responses taken by the compiled stream and reap")
    assert states == STREAM_STATES and violations > 5 and failures > 5 and reaped > STREAM_STATES // 2
