"""blkfront against the test backend (tests/hostile_backend.py, honest mode) in its own process.

Covers the block-device API (read, readinto, write, flush, discard, async futures, batches),
negotiation (ring order, queues, indirect, persistent on/off, both ABIs, large sectors, a
small grant budget), connect and close (timeouts naming the state seen, bad xenstore values,
the backend releasing every grant before we unshare), and XSA-396 (a page still mapped after
its response fails the device). One software Xen and one backend process per module.
"""

from __future__ import annotations

import itertools
import random

import pytest

from hostile_backend import known_data, make_vbd, remove_vbd

from xentools.devices.blkfront import (
    BlkFront,
    BlkfrontConfig,
    BlkfrontError,
    ConnectTimeout,
    DeviceFailed,
    RequestFailed,
)
from xentools.platform.interface import PlatformError

SEED = 11
_devids = itertools.count(0)


class Rig:
    """Create a vbd, have the backend process serve it, attach a frontend."""

    def __init__(self, xen, backend, xs0) -> None:
        self.xen = xen
        self.backend = backend
        self.xs0 = xs0
        self.done: dict | None = None
        self.serving = False
        self.dev: BlkFront | None = None

    def vbd(self, offer=None, image=None, session_timeout=20.0):
        index = next(_devids)
        devid = 51712 + 16 * index if index < 16 else (1 << 28) | (index << 8)
        be, fe = make_vbd(self.xs0, backend_domid=0, frontend_domid=1, devid=devid)
        self.backend.serve(be, offer=offer, image={"seed": SEED, **(image or {})}, session_timeout=session_timeout)
        self.serving = True
        return devid, be, fe

    def attach(self, config=None, offer=None, image=None):
        devid, self.be, self.fe = self.vbd(offer, image)
        # On failure attach() has closed the frontend; the test calls finish().
        self.dev = BlkFront.attach(self.xen.platform(1), devid, config=config)
        return self.dev

    def finish(self) -> dict:
        self.serving = False
        self.done = self.backend.wait_done(30)
        remove_vbd(self.xs0, self.be, self.fe)
        return self.done

    def cleanup(self) -> None:
        """After a failed test: close what it left open, so the next test starts clean."""
        if self.dev is not None:
            self.dev.close()
        if self.serving:
            self.finish()


@pytest.fixture
def rig(xen, backend, xs0):
    made = Rig(xen, backend, xs0)
    yield made
    made.cleanup()


def _close(rig, dev) -> dict:
    dev.close()
    done = rig.finish()
    assert done["error"] is None, done
    return done


def test_default_attach_reads_writes_and_closes_cleanly(rig):
    dev = rig.attach()
    info = dev.info
    assert (info.sectors, info.sector_size, info.protocol) == (8192, 512, "x86_64-abi")
    assert info.persistent and info.flush_cache and info.discard
    assert info.num_queues == 2 and info.ring_page_order == 2 and info.ring_entries == 128
    assert info.segments_per_request == 256 and info.max_indirect_segments == 256
    assert dev.read(0, 8) == known_data(SEED, 0, 4096)
    assert dev.read(3, 1) == known_data(SEED, 3 * 512, 512)  # one sector, unaligned
    data = random.Random(1).randbytes(40 * 512)
    dev.write(101, data)  # 5 pages + 0 sectors: direct request, partial last page
    assert dev.read(101, 40) == data
    assert dev.read(100, 1) == known_data(SEED, 100 * 512, 512)  # neighbours untouched
    assert dev.read(141, 1) == known_data(SEED, 141 * 512, 512)
    dev.flush()
    dev.discard(200, 16)
    assert dev.read(200, 16) == bytes(16 * 512)
    assert dev.stats["direct_requests"] > 0 and dev.stats["callback_errors"] == 0
    _close(rig, dev)
    assert dev.close_report == {"backend_closed": True, "leaked_pages": 0, "still_mapped": 0}


def test_large_reads_use_indirect_requests_and_split(rig):
    dev = rig.attach(BlkfrontConfig(max_indirect_segments=64))
    assert dev.info.segments_per_request == 64
    whole = dev.read(0, 8192)  # 4 MiB: 16 indirect requests of 64 segments
    assert whole == known_data(SEED, 0, 8192 * 512)
    buf = bytearray(700 * 512)
    assert dev.readinto(5, buf) == len(buf)
    assert bytes(buf) == known_data(SEED, 5 * 512, len(buf))
    assert dev.stats["indirect_requests"] >= 16 + 1
    _close(rig, dev)


def test_async_batch_notifies_once_per_queue(rig):
    dev = rig.attach(BlkfrontConfig(num_queues=3, ring_page_order=1))
    assert dev.info.num_queues == 3 and dev.info.ring_entries == 64
    before = dev.stats["notifications"]
    rng = random.Random(5)
    wanted = [(rng.randrange(8000), rng.randrange(1, 64)) for _ in range(60)]
    done = []
    with dev.batch():
        futures = [dev.submit_read(s, n, callback=done.append) for s, n in wanted]
        assert dev.stats["notifications"] == before  # nothing published inside the batch
    assert dev.stats["notifications"] - before <= 3
    for fut, (sector, count) in zip(futures, wanted):
        assert fut.result(10) == known_data(SEED, sector * 512, count * 512)
    assert len(done) == len(wanted) and all(f.done() for f in done)
    _close(rig, dev)


@pytest.mark.parametrize("protocol", ["x86_32-abi", "x86_64-abi"])
@pytest.mark.parametrize("persistent", [False, True])
def test_abis_and_persistent_grants(rig, protocol, persistent):
    dev = rig.attach(BlkfrontConfig(protocol=protocol, persistent=persistent, ring_page_order=0, num_queues=1))
    assert dev.info.protocol == protocol and dev.info.persistent is persistent
    rng = random.Random(hash((protocol, persistent)) & 0xFFFF)
    shadow = bytearray(known_data(SEED, 0, 8192 * 512))
    for _ in range(12):
        sector = rng.randrange(8000)
        count = rng.choice([1, 8, 24, 90, 190])
        count = min(count, 8192 - sector)
        if rng.random() < 0.5:
            data = rng.randbytes(count * 512)
            dev.write(sector, data)
            shadow[sector * 512 : (sector + count) * 512] = data
        else:
            assert dev.read(sector, count) == shadow[sector * 512 : (sector + count) * 512]
    assert dev.read(0, 8192) == shadow
    _close(rig, dev)
    assert dev.close_report["leaked_pages"] == 0


def test_small_grant_budget_backlogs_and_defers(rig):
    for persistent in (True, False):
        config = BlkfrontConfig(max_grants=64, persistent=persistent, ring_page_order=0, num_queues=1)
        dev = rig.attach(config)
        # 63 data/indirect pages: requests stay at half the pool.
        assert dev.info.segments_per_request <= 31
        with dev.batch():  # 40 x 32 KiB at once: nothing is pushed (or completed) before all are in
            futures = [dev.submit_read(s * 64, 64) for s in range(40)]
        for index, fut in enumerate(futures):
            assert fut.result(10) == known_data(SEED, index * 64 * 512, 64 * 512)
        counter = "backlogged" if persistent else "deferred_loads"
        assert dev.stats[counter] > 0, dev.stats
        assert dev._grants.allocator.shared_pages <= 63
        _close(rig, dev)


def test_indirect_off_and_one_queue_offered(rig):
    dev = rig.attach(offer={"max_indirect_segments": 0, "max_queues": 1, "max_ring_page_order": 0})
    info = dev.info
    assert (info.max_indirect_segments, info.segments_per_request, info.num_queues, info.ring_page_order) == (0, 11, 1, 0)
    assert dev.read(0, 1000) == known_data(SEED, 0, 1000 * 512)
    assert dev.stats["indirect_requests"] == 0
    _close(rig, dev)


def test_large_sector_size(rig):
    dev = rig.attach(image={"sectors": 1024, "sector_size": 4096})
    assert (dev.info.sector_size, dev.info.sectors) == (4096, 1024)
    assert dev.read(7, 3) == known_data(SEED, 7 * 4096, 3 * 4096)
    dev.write(1, b"\x5a" * 4096)
    assert dev.read(0, 3) == known_data(SEED, 0, 4096) + b"\x5a" * 4096 + known_data(SEED, 8192, 4096)
    _close(rig, dev)


def test_sector_size_needs_large_sector_feature(rig):
    with pytest.raises(BlkfrontError) as err:
        rig.attach(BlkfrontConfig(large_sector_size=False), image={"sectors": 64, "sector_size": 1024})
    assert err.value.rule == "backend.sector-size.large"
    assert rig.finish()["error"] is None


def test_bad_input_raises_one_narrow_error(rig):
    dev = rig.attach(offer={"discard": False, "flush": False})
    with pytest.raises(BlkfrontError, match="request.range"):
        dev.read(8190, 3)
    with pytest.raises(BlkfrontError, match="request.range"):
        dev.read(-1, 1)
    with pytest.raises(BlkfrontError, match="request.length"):
        dev.write(0, b"x" * 100)
    with pytest.raises(BlkfrontError, match="request.buffer"):
        dev.readinto(0, b"immutable" * 512)
    with pytest.raises(BlkfrontError, match="discard.unsupported"):
        dev.discard(0, 8)
    dev.flush()  # no flush offered: nothing to flush, completes at once
    assert dev.failed is None
    _close(rig, dev)


def test_readonly_disk_refuses_writes_before_sending(rig):
    dev = rig.attach(offer={"readonly": True})
    assert dev.info.readonly
    with pytest.raises(BlkfrontError, match="request.readonly"):
        dev.write(0, bytes(512))
    assert dev.read(0, 1) == known_data(SEED, 0, 512)
    _close(rig, dev)


def test_backend_never_reaching_initwait_times_out_naming_its_state(rig):
    devid, rig.be, rig.fe = rig.vbd(offer={"stall_in": "Initialising"}, session_timeout=10)
    with pytest.raises(ConnectTimeout) as err:
        BlkFront.attach(rig.xen.platform(1), devid, config=BlkfrontConfig(connect_timeout=0.4))
    message = str(err.value)
    assert "never reached InitWait" in message and "Initialising (1)" in message
    assert rig.finish()["error"] is None


def test_backend_stuck_in_initwait_times_out_before_connected(rig):
    devid, rig.be, rig.fe = rig.vbd(offer={"stall_in": "InitWait"}, session_timeout=10)
    with pytest.raises(ConnectTimeout, match=r"never reached Connected .* InitWait \(2\)"):
        BlkFront.attach(rig.xen.platform(1), devid, config=BlkfrontConfig(connect_timeout=0.4, close_timeout=2))
    assert rig.finish()["error"] is None


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("sectors", "12abc", "backend.sectors.malformed"),
        ("sector-size", "1000", "backend.sector-size.range"),
        ("max-ring-page-order", "-1", "backend.max-ring-page-order.malformed"),
        ("multi-queue-max-queues", "0", "backend.multi-queue-max-queues.range"),
        ("feature-persistent", "yes", "backend.feature-persistent.malformed"),
        ("state", "42", "state.unknown"),
    ],
)
def test_bad_backend_keys_fail_the_connect_with_the_key(rig, key, value, rule):
    with pytest.raises(BlkfrontError) as err:
        rig.attach(BlkfrontConfig(connect_timeout=3, close_timeout=2), offer={"bad_keys": {key: value}})
    assert err.value.rule == rule
    assert rig.finish()["error"] is None


def test_unparsable_vbd_is_one_error(xen):
    with pytest.raises(BlkfrontError, match="vbd.spec"):
        BlkFront.attach(xen.platform(1), "xvd!")


def test_page_still_mapped_after_response_fails_the_device(rig):
    dev = rig.attach(BlkfrontConfig(persistent=False), offer={"leak_mapping": True})
    with pytest.raises(DeviceFailed) as err:
        dev.read(0, 8)
    assert err.value.rule == "grant.still_mapped"
    with pytest.raises(DeviceFailed):
        dev.read(8, 8)
    assert dev._grants.tag.quarantined  # the ref is held, its page never reused (XSA-396)
    _close(rig, dev)


def test_barrier_when_no_flush_and_callbacks_that_raise(rig):
    dev = rig.attach(offer={"barrier": True, "flush": False})
    assert dev.info.barrier and not dev.info.flush_cache
    dev.flush()  # sent as WRITE_BARRIER without data
    fut = dev.submit_read(0, 1, callback=lambda f: 1 / 0)
    assert fut.result(5) == known_data(SEED, 0, 512)
    assert dev.stats["callback_errors"] == 1 and dev.failed is None
    assert dev.stats["requests"] == 2
    _close(rig, dev)


def test_eopnotsupp_turns_a_feature_off(rig):
    dev = rig.attach(offer={"refuse_ops": [3, 5]})  # FLUSH_DISKCACHE, DISCARD
    assert dev.info.flush_cache and dev.info.discard
    with pytest.raises(RequestFailed, match="response.eopnotsupp"):
        dev.flush()
    with pytest.raises(RequestFailed, match="response.eopnotsupp"):
        dev.discard(0, 8)
    assert not dev.info.flush_cache and not dev.info.discard and dev.failed is None
    sent = dev.stats["requests"]
    dev.flush()  # nothing left to flush with: completes at once
    with pytest.raises(BlkfrontError, match="discard.unsupported"):
        dev.discard(0, 8)
    assert dev.stats["requests"] == sent
    assert dev.read(0, 8) == known_data(SEED, 0, 4096)
    _close(rig, dev)


def test_backend_resize_and_backend_closing(rig):
    dev = rig.attach()
    assert dev.sectors == 8192
    rig.xs0.write(f"{rig.be}/sectors", "4096")
    rig.xs0.write(f"{rig.be}/state", "4")  # Connected again: blkif's resize announcement
    _wait_for(lambda: dev.sectors == 4096)
    assert dev.info.sectors == 4096 and dev.failed is None
    with pytest.raises(BlkfrontError, match="request.range"):
        dev.read(4095, 2)
    rig.xs0.write(f"{rig.be}/state", "5")  # the backend is going away
    _wait_for(lambda: dev.failed is not None)
    assert dev.failed[0] == "backend.closed"
    with pytest.raises(DeviceFailed, match="backend.closed"):
        dev.read(0, 1)
    _close(rig, dev)


def _wait_for(predicate, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_request_failed_is_per_request(rig):
    dev = rig.attach(offer={"readonly": True})
    # Bypass the frontend's own read-only check to see the backend's ERROR answer.
    object.__setattr__(dev.info, "readonly", False)
    with pytest.raises(RequestFailed, match="response.error"):
        dev.write(0, bytes(512))
    assert dev.failed is None
    assert dev.read(0, 1) == known_data(SEED, 0, 512)
    _close(rig, dev)


def test_persistent_pages_never_exceed_the_backends_cache(rig):
    """Budgets are consistent: with persistent grants the frontend keeps at most
    max_persistent_grants pages granted (the backend's cache per ring), however large
    max_grants is; without them the whole budget (minus the rings) serves data."""
    config = BlkfrontConfig(max_grants=4096, max_persistent_grants=200, persistent=True,
                            ring_page_order=0, num_queues=2)
    dev = rig.attach(config)
    assert dev.info.persistent and dev.info.data_pages == 200
    assert dev.info.segments_per_request <= 100  # requests stay within half the pool
    futures = [dev.submit_read(s * 256, 256) for s in range(30)]  # 30 x 128 KiB at once
    for index, fut in enumerate(futures):
        assert fut.result(10) == known_data(SEED, index * 256 * 512, 256 * 512)
    assert dev._grants.allocator.shared_pages <= 200
    _close(rig, dev)
    dev = rig.attach(BlkfrontConfig(max_grants=300, persistent=False, ring_page_order=0, num_queues=1))
    assert not dev.info.persistent and dev.info.data_pages == 299
    _close(rig, dev)
    with pytest.raises(BlkfrontError, match="config.max_persistent_grants"):
        BlkfrontConfig(max_persistent_grants=10)


def test_batch_submit_and_reap_into_caller_buffers(rig):
    dev = rig.attach(BlkfrontConfig(ring_page_order=2, num_queues=2))
    buf = bytearray(64 * 4096)
    view = memoryview(buf)
    before = dict(dev.stats)
    futures = dev.submit_reads([(i * 8 * 3, view[i * 4096 : (i + 1) * 4096]) for i in range(64)])
    # One push per queue for the whole batch: at most one notification each.
    assert dev.stats["notifications"] - before["notifications"] <= 2
    assert dev.stats["requests"] - before["requests"] == 64
    done: list = []
    while len(done) < 64:
        got = dev.reap([f for f in futures if f not in done], min_done=8, timeout=10)
        assert got and all(f.done() for f in got)
        done += got
    assert [f.result() for f in futures] == [4096] * 64
    for i in range(64):
        assert buf[i * 4096 : (i + 1) * 4096] == known_data(SEED, i * 3 * 4096, 4096)
    # Writes in a batch; a bad request anywhere refuses the whole batch before sending any.
    requests = dev.stats["requests"]
    with pytest.raises(BlkfrontError, match="request.length"):
        dev.submit_writes([(0, b"\1" * 512), (8, b"\2" * 100)])
    assert dev.stats["requests"] == requests
    futures = dev.submit_writes([(0, b"\1" * 512), (8, b"\2" * 4096)])
    assert len(dev.reap(futures, min_done=2, timeout=10)) == 2
    assert dev.read(0, 16) == b"\1" * 512 + known_data(SEED, 512, 7 * 512) + b"\2" * 4096
    _close(rig, dev)


def test_a_release_that_fails_is_reported_and_every_other_release_runs(rig):
    """One teardown path: a release that raises (here every event channel unbind) is one
    line of close_report["teardown_errors"]; the rings and data pages are still unshared,
    the grant and event channel handles and the xenstore connection still closed."""
    platform = rig.xen.platform(1)
    released: list[str] = []
    open_evtchn, open_gntshr, open_xenstore = platform.open_evtchn, platform.open_gntshr, platform.open_xenstore

    def refusing_evtchn():
        channels = open_evtchn()

        def unbind(port):
            raise PlatformError(f"test: unbind of port {port} refused")

        channels.unbind = unbind
        close = channels.close
        channels.close = lambda: (released.append("evtchn"), close())[1]
        return channels

    def counting_gntshr():
        sharer = open_gntshr()
        share, unshare, close = sharer.share, sharer.unshare, sharer.close
        shared: list = []
        sharer.share = lambda *a, **k: shared.append(share(*a, **k)) or shared[-1]
        sharer.unshare = lambda pages: (shared.remove(pages), unshare(pages))[1]
        sharer.close = lambda: (released.append(f"gntshr, {len(shared)} left shared"), close())[1]
        return sharer

    def counting_xenstore(**kwargs):
        xs = open_xenstore(**kwargs)
        close = xs.close
        xs.close = lambda: (released.append("xenstore"), close())[1]
        return xs

    platform.open_evtchn, platform.open_gntshr = refusing_evtchn, counting_gntshr
    platform.open_xenstore = counting_xenstore
    devid, rig.be, rig.fe = rig.vbd()
    dev = rig.dev = BlkFront.attach(platform, devid, config=BlkfrontConfig(num_queues=2, persistent=False))
    assert dev.read(0, 64) == known_data(SEED, 0, 64 * 512)
    _close(rig, dev)
    errors = dev.close_report["teardown_errors"]
    assert [line.split(":")[0] for line in errors] == ["ring 1 event channel", "ring 0 event channel"], errors
    assert all("unbind of port" in line for line in errors), errors
    assert released == ["evtchn", "gntshr, 0 left shared", "xenstore"], released
    assert dev.close_report["leaked_pages"] == 0 and dev.close_report["still_mapped"] == 0
    assert dev.status == "closed"
    dev.close()  # idempotent: nothing runs twice
    assert released == ["evtchn", "gntshr, 0 left shared", "xenstore"]
