"""blkfront's batch API (BlkFront.batch_io, blkfront_batch.BatchIO) end to end: our blkfront
in this process, blkback (`python -m xentools blkback serve`) in its own, one software Xen.

- Reads into the caller's buffers and reads left in the granted pages, writes, direct and
  INDIRECT lanes: every byte checked against the image's content, through the compiled
  fill and reap and through the pure-Python path (the compiled module hidden).
- A batch is published with one push: at most one notification for many requests.
- The lanes come out of the persistent-grant pool: a depth the pool cannot hold is refused
  in one line and leaves the pool as it was; a device without persistent grants refuses.
- Bad requests raise before anything is submitted.
- A backend that stops answering fails the device (the lanes' deadlines count) and the
  batch says so (DeviceFailed), never hangs.
- On the software Xen the reap sleeps in one compiled call (xt_front_wait): rsp_event armed
  at the response that makes min_done, the event taken and unmasked there, the port's word
  left clean.
"""

from __future__ import annotations

import contextlib
import os
import random
import time

import pytest
from support import stopped

from xentools.devices import blkfront_batch
from xentools.devices.blkfront import BlkFront, BlkfrontConfig, BlkfrontError, DeviceFailed, RequestFailed
from xentools.tools.demo import MIB, LocalRig

DISK = 24 * MIB


@pytest.fixture(scope="module")
def rig():  # type: ignore[no-untyped-def]
    with LocalRig(DISK, seed=11) as rig:
        yield rig


def _config(**kw) -> BlkfrontConfig:  # type: ignore[no-untyped-def]
    return BlkfrontConfig(ring_page_order=2, max_indirect_segments=256, **kw)


def _compiled_module():  # type: ignore[no-untyped-def]
    try:
        from xentools.devices import _blkback_ringloop  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _blkback_ringloop


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("request_bytes,depth", [(4096, 32), (44 * 1024, 8), (MIB, 3)], ids=["4k", "44k", "1m"])
def test_batches_move_the_right_bytes(rig, path, request_bytes, depth, monkeypatch) -> None:
    module = _compiled_module()
    if path == "compiled":
        assert module is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkfront_batch, "compiled_module", lambda: module if path == "compiled" else None)
    rng = random.Random(request_bytes + (path == "python"))
    sectors = DISK // 512
    with rig.attach(_config()) as dev:
        with dev.batch_io(depth=depth, request_bytes=request_bytes) as io:
            assert io.compiled == (path == "compiled")
            for _ in range(6):
                # Writes first (the image's copy in rig.shadow follows), then reads.
                writes = []
                for _ in range(depth):
                    n = rng.randrange(1, request_bytes // 512 + 1)
                    sector = rng.randrange(sectors - n)
                    writes.append((sector, rng.randbytes(n * 512)))
                writes = [w for i, w in enumerate(writes)
                          if all(not (w[0] < o[0] + len(o[1]) // 512 and o[0] < w[0] + len(w[1]) // 512)
                                 for o in writes[:i])]  # no two writes of a batch overlap
                tags = io.submit_writes(writes)
                assert len(tags) == len(writes)
                done = io.reap(len(tags), 30)
                assert sorted(done) == sorted((tag, 0) for tag in tags)
                for sector, data in writes:
                    rig.shadow[sector * 512 : sector * 512 + len(data)] = data
                reads = []
                for _ in range(depth):
                    n = rng.randrange(1, request_bytes // 512 + 1)
                    sector = rng.randrange(sectors - n)
                    reads.append((sector, bytearray(n * 512) if rng.random() < 0.5 else n))
                notified = dev.stats["notifications"]
                tags = io.submit_reads(reads)
                assert dev.stats["notifications"] - notified <= 1  # one push for the batch
                by_tag = dict(zip(tags, reads))
                for tag, status in io.reap(len(tags), 30):
                    assert status == 0
                    sector, target = by_tag.pop(tag)
                    got = io.view(tag) if isinstance(target, int) else target
                    n = target if isinstance(target, int) else len(target) // 512
                    assert bytes(got) == rig.shadow[sector * 512 : (sector + n) * 512], (tag, sector, n)
                assert not by_tag
            if path == "compiled":
                assert io.lanes.compiled_fills and io.lanes.compiled_reaps
        # The disk as a whole, through the future API.
        assert dev.read(0, 2048) == rig.shadow[: 2048 * 512]


def test_batch_and_futures_share_a_queue(rig) -> None:
    """Responses to a batch and to the future API interleave on one ring: the caller's reap
    takes the batch's, the completion thread the others (it is woken when the caller finds
    one it must not judge), and every read returns its own bytes."""
    rng = random.Random(5)
    with rig.attach(_config(num_queues=1)) as dev:
        with dev.batch_io(depth=16, request_bytes=8192) as io:
            for _ in range(30):
                sectors = [rng.randrange(DISK // 512 - 16) for _ in range(8)]
                futures = [dev.submit_read(sector, 16) for sector in sectors[:4]]
                tags = io.submit_reads([(sector, 16) for sector in sectors[4:]])
                by_tag = dict(zip(tags, sectors[4:]))
                for tag, status in io.reap(len(tags), 30):
                    assert status == 0
                    sector = by_tag.pop(tag)
                    assert bytes(io.view(tag)) == rig.shadow[sector * 512 : (sector + 16) * 512]
                for fut, sector in zip(futures, sectors[:4]):
                    assert fut.result(30) == rig.shadow[sector * 512 : (sector + 16) * 512]
        assert dev.stats["responses"] == dev.stats["requests"]


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_lane_pages_are_zeroed_when_shared_and_when_given_back_not_per_read(rig, path, monkeypatch) -> None:
    """XSA-403 as blkfront_batch's docstring says it: a lane's pages come zeroed from the pool,
    keep the backend's bytes between requests (a read is not preceded by a memset: the backend
    wrote or was given every byte there), and go back to the pool zeroed at close()."""
    module = _compiled_module()
    if path == "compiled":
        assert module is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkfront_batch, "compiled_module", lambda: module if path == "compiled" else None)
    with rig.attach(_config()) as dev:
        io = dev.batch_io(depth=2, request_bytes=8192)
        pages = [lane.data for lane in io.lanes.lanes]
        assert all(not any(page) for page in pages)  # zeroed before first sharing
        buf = bytearray(8192)
        (tag,) = io.submit_reads([(40, buf)])
        assert io.reap(1, 30) == [(tag, 0)]
        assert bytes(buf) == rig.shadow[40 * 512 : 56 * 512]
        assert bytes(pages[tag]) == bytes(buf)  # the backend's bytes stay: no memset per read
        (tag2,) = io.submit_reads([(80, 8)])
        assert io.reap(1, 30) == [(tag2, 0)]
        assert bytes(io.view(tag2)) == rig.shadow[80 * 512 : 88 * 512]
        io.close()
        assert all(not any(page) for page in pages)  # given back zeroed (XSA-403)
        assert dev.read(8, 8) == rig.shadow[8 * 512 : 16 * 512]


def test_lanes_stay_within_the_persistent_grant_pool(rig) -> None:
    with rig.attach(_config()) as dev:
        pool = dev.info.data_pages
        assert pool <= dev.config.max_persistent_grants
        with pytest.raises(BlkfrontError) as err:
            dev.batch_io(depth=4, request_bytes=MIB)  # 4 x 257 pages > the pool
        assert err.value.rule == "batch.budget" and str(pool) in str(err.value)
        # Nothing was kept: the largest lanes the pool holds still fit, and the future API works.
        with dev.batch_io(depth=pool // 257, request_bytes=MIB) as io:
            assert io.pages <= pool
        assert dev.read(8, 8) == rig.shadow[8 * 512 : 16 * 512]
    with rig.attach(_config(persistent=False)) as dev:
        with pytest.raises(BlkfrontError) as err:
            dev.batch_io()
        assert err.value.rule == "batch.persistent"


def test_bad_requests_raise_before_anything_is_sent(rig) -> None:
    with rig.attach(_config()) as dev:
        with dev.batch_io(depth=4, request_bytes=8192) as io:
            before = dev.stats["requests"]
            for bad, rule in (
                ([(0, 8), (DISK // 512 - 4, 8)], "request.range"),
                ([(0, 8), (-1, 8)], "request.range"),
                ([(0, 32)], "request.length"),
                ([(0, bytearray(100))], "request.length"),
                ([(0, b"read-only")], "request.buffer"),
            ):
                with pytest.raises(BlkfrontError) as err:
                    io.submit_reads(bad)
                assert err.value.rule == rule, (bad, err.value)
            assert dev.stats["requests"] == before
            with pytest.raises(BlkfrontError):
                dev.batch_io()  # one batch per queue


def test_a_backend_that_stops_answering_fails_the_batch(rig) -> None:
    with rig.attach(_config(request_timeout=1.0)) as dev:
        io = dev.batch_io(depth=8, request_bytes=4096)
        with stopped(rig.backend.pid):
            io.submit_reads([(sector * 8, 8) for sector in range(8)])
            with pytest.raises(DeviceFailed) as err:
                io.reap(8, 20)
            assert err.value.rule == "response.timeout"
        io.close()
        with pytest.raises(DeviceFailed):
            io.submit_reads([(0, 8)])


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_the_caller_sleeps_on_the_event_channel_itself(rig, path, monkeypatch) -> None:
    """While every request of the queue is the batch's, a reap that must sleep waits on the
    event channel in the caller's thread and handles the events there (the completion
    thread is not woken per batch): the caller takes events itself, and every read returns
    its own bytes."""
    module = _compiled_module()
    monkeypatch.setattr(blkfront_batch, "compiled_module", lambda: module if path == "compiled" else None)
    rng = random.Random(17)
    with rig.attach(_config()) as dev:
        events = dev.stats["events"]
        with dev.batch_io(depth=32, request_bytes=4096) as io:
            for _ in range(60):
                sectors = [rng.randrange(DISK // 512 - 8) for _ in range(32)]
                buffers = [bytearray(4096) for _ in sectors]
                tags = io.submit_reads(list(zip(sectors, buffers)))
                by_tag = dict(zip(tags, zip(sectors, buffers)))
                left = len(tags)
                while left:
                    for tag, status in io.reap(1, 30):
                        assert status == 0
                        sector, buf = by_tag.pop(tag)
                        assert bytes(buf) == rig.shadow[sector * 512 : sector * 512 + 4096]
                        left -= 1
            # The caller slept on the event channel and took events itself (the completion
            # thread may take one that comes while the caller is not waiting).
            assert io.waits > 0 and io.events_taken > 0
            assert dev.stats["events"] - events >= io.events_taken
        assert dev.read(0, 8) == rig.shadow[:4096]  # the completion thread serves futures again


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("kind", ["bad_id", "duplicate", "wrong_op", "garbage_status", "never_sent"])
def test_a_hostile_response_met_by_a_waiting_caller_fails_the_device(xen, backend, xs0, kind, path,
                                                                       monkeypatch) -> None:
    """A malformed response reaped on the caller's thread (after it slept on the event
    channel) is judged by the Python path: the batch raises DeviceFailed with the rule,
    and every read answered before it holds the image's bytes. Event storms (spurious
    events) on the way are counted, not fatal."""
    from hostile_backend import known_data, make_vbd, remove_vbd

    module = _compiled_module()
    monkeypatch.setattr(blkfront_batch, "compiled_module", lambda: module if path == "compiled" else None)
    devid = 300 + 2 * ["bad_id", "duplicate", "wrong_op", "garbage_status", "never_sent"].index(kind) + (path == "python")
    seed = devid * 7919
    be, fe = make_vbd(xs0, backend_domid=0, frontend_domid=1, devid=devid)
    backend.serve(be, offer={"persistent": True, "max_ring_page_order": 1},
                  image={"sectors": 4096, "seed": seed},
                  hostile={"seed": seed, "honest": 24, "nonfatal": ["storm", "storm"], "fatal": kind, "extra": 0},
                  session_timeout=15)
    try:
        with BlkFront.attach(xen.platform(1), devid, config=BlkfrontConfig(ring_page_order=1, request_timeout=5.0)) as dev:
            io = dev.batch_io(depth=4, request_bytes=4096)
            with pytest.raises(DeviceFailed) as err:
                for round_ in range(40):
                    sectors = [(round_ * 4 + i) * 8 % 4088 for i in range(4)]
                    buffers = [bytearray(4096) for _ in sectors]
                    tags = io.submit_reads(list(zip(sectors, buffers)))
                    by_tag = dict(zip(tags, zip(sectors, buffers)))
                    for tag, status in io.reap(len(tags), 10):
                        sector, buf = by_tag[tag]
                        if status == 0:
                            assert bytes(buf) == known_data(seed, sector * 512, 4096), (kind, sector)
            assert err.value.rule.startswith(("response.", "ring.")), err.value
            assert io.waits > 0 and io.events_taken > 0
            # The handle holds two ports here (direct_link refuses): the Python wait.
            assert not io.lanes.events_attached  # two ports on the handle: the Python wait
            io.close()
    finally:
        done = backend.wait_done(20)
        remove_vbd(xs0, be, fe)
    assert done["fatal_sent"], done


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("request_bytes,depth", [(4096, 32), (MIB, 3)], ids=["4k", "1m"])
def test_reads_into_registered_buffers(rig, path, request_bytes, depth, monkeypatch) -> None:
    """register_buffers + read_sectors + reap_tags: each read lands in the registered buffer
    of the tag it took, every byte the image's, on both paths; one push per batch; a
    failed read would be listed with its status (none here)."""
    module = _compiled_module()
    if path == "compiled":
        assert module is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkfront_batch, "compiled_module", lambda: module if path == "compiled" else None)
    rng = random.Random(request_bytes * 3 + (path == "python"))
    nsect = request_bytes // 512
    with rig.attach(_config()) as dev:
        with dev.batch_io(depth=depth, request_bytes=request_bytes) as io:
            buffers = [bytearray(request_bytes) for _ in range(depth)]
            io.register_buffers(buffers)
            pending: dict[int, int] = {}
            left = 8 * depth
            while left or pending:
                free = depth - len(pending)
                if left and free:
                    sectors = [rng.randrange(DISK // 512 - nsect) for _ in range(min(free, left))]
                    notified = dev.stats["notifications"]
                    tags = io.read_sectors(sectors)
                    assert dev.stats["notifications"] - notified <= 1
                    assert len(tags) == len(sectors)
                    left -= len(tags)
                    for tag, sector in zip(tags, sectors):
                        assert tag not in pending
                        pending[tag] = sector
                done, failed = io.reap_tags(1, 30)
                assert failed == []
                for tag in done:
                    sector = pending.pop(tag)
                    assert io.buffer(tag).obj is buffers[tag] or bytes(io.buffer(tag)) == bytes(buffers[tag])
                    assert bytes(buffers[tag]) == rig.shadow[sector * 512 : sector * 512 + request_bytes], (tag, sector)
            if path == "compiled":
                assert io.lanes.compiled_fills and io.lanes.compiled_reaps
            # The other API still works on the same lanes afterwards.
            tags = io.submit_reads([(0, nsect)])
            assert io.reap(1, 30) == [(tags[0], 0)]
            assert bytes(io.view(tags[0])) == rig.shadow[:request_bytes]


def test_registered_reads_refuse_bad_input_in_one_line(rig) -> None:
    with rig.attach(_config()) as dev:
        with dev.batch_io(depth=4, request_bytes=8192) as io:
            with pytest.raises(BlkfrontError) as err:
                io.read_sectors([0])
            assert err.value.rule == "batch.buffers"
            for bad in ([bytearray(8192)] * 3, [bytearray(100)] * 4, [b"x" * 8192] * 4):
                with pytest.raises(BlkfrontError) as err:
                    io.register_buffers(bad)
                assert err.value.rule == "request.buffer", bad[:1]
            io.register_buffers([bytearray(8192) for _ in range(4)])
            before = dev.stats["requests"]
            for bad, rule in (([0, DISK // 512 - 8], "request.range"), ([0, -1], "request.range"),
                              ([0, 1.5], "request.range")):
                with pytest.raises(BlkfrontError) as err:
                    io.read_sectors(bad)
                assert err.value.rule == rule, (bad, err.value)
            assert dev.stats["requests"] == before
            assert io.reap_tags(0, 5) == ([], [])


def test_the_compiled_wait_arms_rsp_event_takes_the_event_and_leaves_the_word_clean(rig, monkeypatch) -> None:
    """reap_tags(min_done) on the software Xen sleeps in one compiled call (xt_front_wait):
    it arms rsp_event at the response that makes min_done (ring.h's final check, never
    beyond the requests in flight), takes and unmasks the event itself, and leaves the
    port's word with nothing ready, pending or masked; every read holds the image's bytes."""
    from xentools.platform.sim.evtchn_channel import MASKED, PENDING, READY

    module = _compiled_module()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkfront_batch, "compiled_module", lambda: module)
    rng = random.Random(5)
    depth = 16
    with rig.attach(_config(num_queues=1)) as dev:  # one port on the handle: direct_link gives it
        with dev.batch_io(depth=depth, request_bytes=4096) as io:
            buffers = [bytearray(4096) for _ in range(depth)]
            io.register_buffers(buffers)
            ring = io.lanes.queue.ring
            armed_at_min_done = 0
            for _ in range(40):
                sectors = [rng.randrange(DISK // 512 - 8) for _ in range(depth)]
                tags = io.read_sectors(sectors)
                cons = ring.rsp_cons
                done, failed = io.reap_tags(depth, 30)
                assert sorted(done) == sorted(tags) and not failed
                for tag, sector in zip(tags, sectors):
                    assert bytes(buffers[tag]) == rig.shadow[sector * 512 : sector * 512 + 4096]
                armed = ring.shared.rsp_event
                # Armed in this round: at the depth-th response from where it started; else
                # earlier (never ahead of what was in flight).
                # (the first round may be the Python wait's, which arms one past what it took)
                assert (armed - cons) & 0xFFFFFFFF <= depth + 1 or (cons - armed) & 0xFFFFFFFF < 1 << 31, (cons, armed)
                armed_at_min_done += armed == (cons + depth) & 0xFFFFFFFF
            assert io.lanes.events_attached and io.waits > 0 and io.events_taken > 0
            assert armed_at_min_done > 0
        evtchn = dev._evtchn
        link = evtchn._links[io.lanes.queue.port]
        for _ in range(100):  # the completion thread may hold an event a moment
            if not link.page.word(link.end) & (READY | PENDING | MASKED):
                break
            time.sleep(0.01)
        assert not link.page.word(link.end) & (READY | PENDING | MASKED), hex(link.page.word(link.end))
        assert dev.read(0, 8) == rig.shadow[:4096]


def test_the_compiled_wait_leaves_a_bad_response_to_the_python_path(rig, monkeypatch) -> None:
    """A response the compiled wait cannot take (an id no lane waits for) ends it: the
    Python path judges it and fails the device with the rule."""
    module = _compiled_module()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkfront_batch, "compiled_module", lambda: module)
    with rig.attach(_config(request_timeout=5.0, num_queues=1)) as dev:  # one port: direct_link
        io = dev.batch_io(depth=8, request_bytes=4096)
        io.register_buffers([bytearray(4096) for _ in range(8)])
        for _ in range(20):  # attached at the first wait after the handle linked the port
            tags = io.read_sectors(list(range(0, 64, 8)))
            assert sorted(io.reap_tags(8, 10)[0]) == sorted(tags)
            if io.lanes.events_attached:
                break
        assert io.lanes.events_attached
        with stopped(rig.backend.pid):  # it answers nothing while the test forges
            io.read_sectors([8])
            queue = io.lanes.queue
            ring = queue.ring
            prod = ring.shared.rsp_prod
            # What a misbehaving backend writes: a response to a request never sent.
            ring.shared.write_slot(prod, queue.codec.response_bytes(0xDEAD0000, 0, 0))
            ring.shared.rsp_prod = (prod + 1) & 0xFFFFFFFF
            with pytest.raises(DeviceFailed) as err:
                io.reap_tags(1, 10)
            assert err.value.rule.startswith("response."), err.value
        io.close()


# -- read_many -------------------------------------------------------------------------------


def _path(path: str, monkeypatch):  # type: ignore[no-untyped-def]
    """Pick the compiled fill and reap (and stream) or the pure-Python path for batches."""
    module = _compiled_module()
    if path == "compiled":
        assert module is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkfront_batch, "compiled_module", lambda: module if path == "compiled" else None)


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("request_bytes,depth,count", [(4096, 32, 3000), (44 * 1024, 8, 150), (MIB, 3, 12)],
                         ids=["4k", "44k", "1m"])
def test_read_many_reads_every_request_into_its_place(rig, path, request_bytes, depth, count, monkeypatch) -> None:
    """read_many(sectors, into): the k-th read lands at into[k * size : (k + 1) * size], every
    byte the image's (sectors repeat, a view at an odd offset works, nothing is written past
    the last place); on the software Xen the compiled stream carries it."""
    _path(path, monkeypatch)
    rng = random.Random(request_bytes + count + (path == "python"))
    nsect = request_bytes // 512
    with rig.attach(_config(num_queues=1)) as dev:  # one port on the handle: the direct channel
        with dev.batch_io(depth=depth, request_bytes=request_bytes) as io:
            for attempt in range(3):
                sectors = [rng.randrange(DISK // 512 - nsect) for _ in range(count)]
                sectors[-1] = sectors[0]
                backing = bytearray(count * request_bytes + 4096 + 7)
                into = memoryview(backing)[7 : 7 + count * request_bytes] if attempt == 2 else backing
                io.read_many(sectors, into)
                for k, sector in enumerate(sectors):
                    got = bytes(into[k * request_bytes : (k + 1) * request_bytes])
                    assert got == rig.shadow[sector * 512 : sector * 512 + request_bytes], (attempt, k, sector)
                if attempt < 2:
                    assert not any(backing[count * request_bytes :])
            assert not io.lanes.busy and dev.stats["responses"] == dev.stats["requests"]
            if path == "compiled":
                assert io.streamed > 0 and io.lanes.compiled_fills and io.lanes.compiled_reaps
            else:
                assert io.streamed == 0
            # The other API works on the same lanes afterwards.
            tags = io.submit_reads([(0, nsect)])
            assert io.reap(1, 30) == [(tags[0], 0)]
            assert bytes(io.view(tags[0])) == rig.shadow[:request_bytes]


def test_read_many_refuses_bad_input_in_one_line(rig) -> None:
    with rig.attach(_config()) as dev:
        io = dev.batch_io(depth=4, request_bytes=8192)
        before = dev.stats["requests"]
        buf = bytearray(3 * 8192)
        for sectors, into, rule in (
            ([0, DISK // 512 - 8], buf, "request.range"),
            ([0, -1], buf, "request.range"),
            ([0, 1.5], buf, "request.range"),
            ([0, 16, 32, 48], buf, "request.buffer"),  # 4 reads need 32 KiB
            ([0], b"x" * 8192, "request.buffer"),  # read-only
            ([0], 12, "request.buffer"),  # not a buffer
        ):
            with pytest.raises(BlkfrontError) as err:
                io.read_many(sectors, into)
            assert err.value.rule == rule and "\n" not in str(err.value), (sectors, err.value)
        io.submit_reads([(0, 16)])
        with pytest.raises(BlkfrontError) as err:
            io.read_many([0], buf)  # a read in flight
        assert err.value.rule == "batch.busy"
        assert io.reap(1, 30)[0][1] == 0
        io.read_many([], buf)  # nothing to do
        assert dev.stats["requests"] == before + 1
        io.close()
        with pytest.raises(BlkfrontError) as err:
            io.read_many([0], buf)
        assert err.value.rule == "batch.closed"


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_read_many_gives_way_to_futures_on_its_queue(rig, path, monkeypatch) -> None:
    """Futures submitted on the queue while read_many runs wait in the backlog until the
    compiled stream gives way (within a round), then share the queue: every future and
    every read_many returns the image's bytes, nothing fails as stalled."""
    import threading

    _path(path, monkeypatch)
    rng = random.Random(23)
    count = 4000
    with rig.attach(_config(num_queues=1)) as dev:
        with dev.batch_io(depth=32, request_bytes=4096) as io:
            io.read_many([0] * 64, bytearray(64 * 4096))  # the direct channel is attached by now
            sectors = [rng.randrange(DISK // 512 - 8) for _ in range(count)]
            into = bytearray(count * 4096)
            stop = threading.Event()
            errors: list[BaseException] = []
            passes = [0]

            def reader() -> None:
                try:
                    while not stop.is_set() or not passes[0]:
                        io.read_many(sectors, into)
                        passes[0] += 1
                except BaseException as err:  # noqa: BLE001 - reported by the test
                    errors.append(err)

            thread = threading.Thread(target=reader)
            thread.start()
            try:
                for _ in range(40):
                    sector = rng.randrange(DISK // 512 - 16)
                    assert dev.submit_read(sector, 16).result(30) == rig.shadow[sector * 512 : (sector + 16) * 512]
            finally:
                stop.set()
                thread.join(60)
            assert not thread.is_alive() and not errors, errors
            for k, sector in enumerate(sectors):
                assert into[k * 4096 : (k + 1) * 4096] == rig.shadow[sector * 512 : sector * 512 + 4096], k
            if path == "compiled":
                assert io.gave_way > 0  # the compiled stream carried it, then gave way
        assert dev.stats["responses"] == dev.stats["requests"]


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_close_from_another_thread_ends_read_many(rig, path, monkeypatch) -> None:
    """io.close() on another thread while read_many waits: read_many fills no more, waits
    for what is in flight (their bytes land) and raises "batch.closed"; close() returns
    after it, and the device serves futures again."""
    import threading

    _path(path, monkeypatch)
    with rig.attach(_config(num_queues=1, request_timeout=30.0)) as dev:
        io = dev.batch_io(depth=8, request_bytes=4096)
        io.read_many([0] * 16, bytearray(16 * 4096))  # the direct channel is attached by now
        count = 2000
        sectors = [(k * 8) % (DISK // 512 - 8) for k in range(count)]
        into = bytearray(count * 4096)
        outcome: list[BaseException | None] = []

        def reader() -> None:
            try:
                io.read_many(sectors, into)
                outcome.append(None)
            except BaseException as err:  # noqa: BLE001 - checked below
                outcome.append(err)

        thread = threading.Thread(target=reader)
        closer = threading.Thread(target=io.close)
        with stopped(rig.backend.pid):
            thread.start()
            deadline = time.monotonic() + 10
            while io.lanes.busy < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert io.lanes.busy == 8
            if path == "compiled":
                assert io._stream.c is not None  # the compiled stream carries it
            for call in (lambda: io.submit_reads([(0, 8)]), lambda: io.reap(1, 1),
                         lambda: io.read_many([0], bytearray(4096))):
                with pytest.raises(BlkfrontError) as err:  # the lanes are read_many's meanwhile
                    call()
                assert err.value.rule == "batch.busy", err.value
            closer.start()
            time.sleep(0.2)
            assert closer.is_alive() and thread.is_alive()  # the 8 in flight are not answered yet
        thread.join(30)
        closer.join(30)
        assert not thread.is_alive() and not closer.is_alive()
        assert isinstance(outcome[0], BlkfrontError) and outcome[0].rule == "batch.closed", outcome
        assert io.closed
        for k in range(8):
            assert into[k * 4096 : (k + 1) * 4096] == rig.shadow[sectors[k] * 512 : sectors[k] * 512 + 4096]
        assert not any(into[8 * 4096 :])
        with pytest.raises(BlkfrontError) as err:
            io.read_many([0], into)
        assert err.value.rule == "batch.closed"
        assert dev.read(0, 8) == rig.shadow[:4096]


def test_the_compiled_stream_leaves_a_bad_response_to_the_python_path(rig, monkeypatch) -> None:
    """A response the compiled stream cannot take (an id no lane waits for) ends its call:
    the Python path judges it and fails the device with the rule; read_many raises it."""
    import threading

    _path("compiled", monkeypatch)
    with rig.attach(_config(request_timeout=30.0, num_queues=1)) as dev:
        io = dev.batch_io(depth=8, request_bytes=4096)
        into = bytearray(64 * 4096)
        for _ in range(5):
            io.read_many(list(range(0, 512, 8)), into)
        assert io.streamed > 0  # the compiled stream carries it
        outcome: list[BaseException | None] = []

        def reader() -> None:
            try:
                io.read_many(list(range(0, 512, 8)), into)
                outcome.append(None)
            except BaseException as err:  # noqa: BLE001 - checked below
                outcome.append(err)

        thread = threading.Thread(target=reader)
        with stopped(rig.backend.pid):  # it answers nothing while the test forges
            thread.start()
            deadline = time.monotonic() + 10
            while io.lanes.busy < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            queue = io.lanes.queue
            ring = queue.ring
            prod = ring.shared.rsp_prod
            ring.shared.write_slot(prod, queue.codec.response_bytes(0xDEAD0000, 0, 0))
            ring.shared.rsp_prod = (prod + 1) & 0xFFFFFFFF
            thread.join(20)
        assert not thread.is_alive()
        assert isinstance(outcome[0], DeviceFailed) and outcome[0].rule.startswith("response."), outcome
        io.close()


@contextlib.contextmanager
def _hostile_read_many(xen, backend, xs0, devid: int, hostile: dict):  # type: ignore[no-untyped-def]
    """One hostile backend (`hostile`: its honest count, nonfatal and fatal kinds) serving a
    4096-sector image seeded from devid, our device on it, and a batch of depth 4 with 100
    reads to do: yields (io, sectors, into, known) where known(k) is the image's 4 KiB at
    sectors[k]. Ends by waiting for the backend and removing the vbd; the backend's
    report is left in the returned list."""
    from hostile_backend import known_data, make_vbd, remove_vbd

    seed = devid * 7919
    be, fe = make_vbd(xs0, backend_domid=0, frontend_domid=1, devid=devid)
    backend.serve(be, offer={"persistent": True, "max_ring_page_order": 1},
                  image={"sectors": 4096, "seed": seed},
                  hostile={"seed": seed, "extra": 0, **hostile}, session_timeout=15)
    sectors = [(k * 24) % 4088 for k in range(100)]
    report: list[dict] = []
    try:
        with BlkFront.attach(xen.platform(1), devid, config=BlkfrontConfig(ring_page_order=1, request_timeout=5.0)) as dev:
            io = dev.batch_io(depth=4, request_bytes=4096)
            yield io, sectors, bytearray(100 * 4096), lambda k: known_data(seed, sectors[k] * 512, 4096), report
            io.close()
    finally:
        report.append(backend.wait_done(20))
        remove_vbd(xs0, be, fe)


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_read_many_reports_a_failed_read_after_the_others(xen, backend, xs0, path, monkeypatch) -> None:
    """A read answered BLKIF_RSP_ERROR: read_many fills no more, waits for those in flight
    and raises RequestFailed naming the sector and the request; the reads before it hold
    the image's bytes, the failed one's place is untouched, and the batch reads again."""
    import re

    _path(path, monkeypatch)
    hostile = {"honest": 40, "nonfatal": ["error_garbage"], "fatal": None}
    with _hostile_read_many(xen, backend, xs0, 340 + (path == "python"), hostile) as (io, sectors, into, known, _):
        with pytest.raises(RequestFailed) as err:
            io.read_many(sectors, into)
        found = re.search(r"at sector (\d+) \(request (\d+) of read_many's 100, status -1\)", str(err.value))
        assert err.value.rule == "response.error" and found, err.value
        index = int(found[2])
        assert sectors[index] == int(found[1]) and index == 40
        for k in range(index):
            assert into[k * 4096 : (k + 1) * 4096] == known(k), k
        assert not any(into[index * 4096 : (index + 1) * 4096])  # an ERROR's pages are not copied
        assert not io.lanes.busy
        io.read_many(sectors[:20], into)  # the batch is quiet again
        for k in range(20):
            assert into[k * 4096 : (k + 1) * 4096] == known(k), k


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("kind", ["bad_id", "wrong_op", "garbage_status"])
def test_a_hostile_response_fails_read_many(xen, backend, xs0, kind, path, monkeypatch) -> None:
    """A malformed response during read_many is judged by the Python path: read_many
    raises DeviceFailed with the rule, the reads answered before it hold the image's bytes."""
    _path(path, monkeypatch)
    devid = 350 + 2 * ["bad_id", "wrong_op", "garbage_status"].index(kind) + (path == "python")
    hostile = {"honest": 30, "nonfatal": ["storm"], "fatal": kind}
    with _hostile_read_many(xen, backend, xs0, devid, hostile) as (io, sectors, into, known, report):
        with pytest.raises(DeviceFailed) as err:
            io.read_many(sectors, into)
        assert err.value.rule.startswith(("response.", "ring.")), err.value
        for k in range(28):
            assert into[k * 4096 : (k + 1) * 4096] == known(k), (kind, k)
    assert report[0]["fatal_sent"], report
