"""The pipelined blkback: several requests of a ring in flight, responses out of order, and
FLUSH_DISKCACHE / WRITE_BARRIER ordering (a flush waits for its ring, a barrier for every
queue, and nothing starts before a barrier is done).

The backend runs in this process (BlkBackend over the software Xen) on an image whose
reads and writes at chosen offsets miss the page cache and take 0.4 s, so the order of
events is unambiguous; the
frontend is tests/hostile_frontend.RawFrontend (the raw ring, the core codec).
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from hostile_frontend import RawFrontend
from xentools.core import blkif
from xentools.core.blkif import (
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_OKAY,
    Request,
)
from xentools.devices.blkback import BackendConfig, BlkBackend
from xentools.devices.blkback_image import ImageFile, open_image
from xentools.devices.toolstack import create_vbd

MiB = 1 << 20
SLOW = 0.4  # seconds a slow transfer takes
NBYTES = 40 * 1024  # 10 pages: a direct request, above the inline size (runs on an I/O thread)


class SlowImage(ImageFile):
    """An image that logs (event, offset, time) and is slow at `slow` offsets."""

    slow: set[int]
    events: list[tuple[str, int, float]]

    def _log(self, what: str, offset: int) -> None:
        self.events.append((what, offset, time.monotonic()))

    def _logged(self, what: str, move, buffers, offset, total):  # type: ignore[no-untyped-def]
        self._log(f"{what}-start", offset)
        if offset in self.slow:
            time.sleep(SLOW)
        move(buffers, offset, total)
        self._log(f"{what}-end", offset)

    def _try(self, what: str, attempt, buffers, offset, total) -> bool:  # type: ignore[no-untyped-def]
        if offset in self.slow:
            return False  # a page-cache miss: the request goes to an I/O thread
        start = (f"{what}-start", offset, time.monotonic())
        self.events.append(start)
        if not attempt(buffers, offset, total):
            self.events.remove(start)  # it will be done (and logged) by readv/writev instead
            return False
        self._log(f"{what}-end", offset)
        return True

    def try_readv(self, buffers, offset, total):  # type: ignore[no-untyped-def]
        return self._try("read", super().try_readv, buffers, offset, total)

    def try_writev(self, buffers, offset, total):  # type: ignore[no-untyped-def]
        return self._try("write", super().try_writev, buffers, offset, total)

    def readv(self, buffers, offset, total=-1):  # type: ignore[no-untyped-def]
        self._logged("read", super().readv, buffers, offset, total)

    def writev(self, buffers, offset, total=-1):  # type: ignore[no-untyped-def]
        self._logged("write", super().writev, buffers, offset, total)

    def flush(self) -> None:
        super().flush()
        self._log("flush", -1)


@pytest.fixture
def rig(fresh_xen):
    path = os.path.join(fresh_xen.root_dir, "disk.img")
    with open(path, "wb") as f:
        f.write(random.Random(3).randbytes(8 * MiB))
    xs = fresh_xen.platform(0).open_xenstore()
    paths = create_vbd(xs, backend_domid=0, frontend_domid=1, devid=51712, params=path)
    image = open_image(path)
    image.__class__ = SlowImage
    image.slow, image.events = set(), []
    backend = BlkBackend(fresh_xen.platform(0), paths.backend, image, BackendConfig())
    thread = threading.Thread(target=backend.run, daemon=True)
    thread.start()
    fe = RawFrontend(fresh_xen.platform(1), paths.frontend, paths.backend, 0)
    try:
        yield fe, backend, image
    finally:
        fe.close()
        backend.request_stop()
        thread.join(20)
        assert not thread.is_alive(), "the backend did not stop"
        image.close()
        xs.close()


def _content(image: SlowImage) -> bytes:
    with open(image.path, "rb") as f:
        return f.read()


def _event(image: SlowImage, what: str, offset: int) -> float:
    times = [t for w, o, t in image.events if w == what and o == offset]
    assert len(times) == 1, (what, offset, image.events)
    return times[0]


@pytest.mark.parametrize("persistent", [False, True], ids=["grant-per-request", "persistent"])
def test_requests_overlap_and_complete_out_of_order(rig, persistent) -> None:
    fe, backend, image = rig
    fe.connect(order=2, persistent=persistent)
    image.slow.add(0)
    slow_pages, fast_pages, small_pages = fe.share(10), fe.share(10), fe.share(1)
    slow, _ = fe.data_request(BLKIF_OP_READ, 0, slow_pages.refs, NBYTES)
    fast, _ = fe.data_request(BLKIF_OP_READ, 1024, fast_pages.refs, NBYTES)
    small, _ = fe.data_request(BLKIF_OP_READ, 4096, small_pages.refs, 4096)
    ids = [blkif.decode_request_header(s, fe.abi).id for s in (slow, fast, small)]
    fe.submit([slow, fast, small])
    responses = fe.collect(3, timeout=10)
    assert all(r.status == BLKIF_RSP_OKAY for r in responses)
    order = [r.id for r in responses]
    assert sorted(order) == sorted(ids)
    assert order[-1] == ids[0], "the slow read must not hold back the ones after it"
    # The fast read ran while the slow one was in flight.
    assert _event(image, "read-end", 1024 * 512) < _event(image, "read-end", 0)
    assert backend.queues[0].max_in_flight >= 2
    content = _content(image)
    assert bytes(slow_pages.buf[:NBYTES]) == content[:NBYTES]
    assert bytes(fast_pages.buf[:NBYTES]) == content[1024 * 512 : 1024 * 512 + NBYTES]


def test_flush_waits_for_the_writes_before_it(rig) -> None:
    fe, _, image = rig
    fe.connect(order=2)
    image.slow.add(0)
    pages = fe.share(10)
    pages.buf[:NBYTES] = b"\x11" * NBYTES
    write, _ = fe.data_request(BLKIF_OP_WRITE, 0, pages.refs, NBYTES)
    flush = blkif.encode_request(Request(BLKIF_OP_FLUSH_DISKCACHE, 0, fe.new_id(), 0, ()), fe.abi)
    fe.submit([write, flush])
    responses = fe.collect(2, timeout=10)
    assert [r.status for r in responses] == [BLKIF_RSP_OKAY] * 2
    flushes = [t for w, _, t in image.events if w == "flush"]
    assert len(flushes) == 1 and flushes[0] > _event(image, "write-end", 0)


@pytest.mark.parametrize("persistent", [False, True], ids=["grant-per-request", "persistent"])
def test_barrier_waits_for_every_queue_and_holds_back_later_requests(rig, persistent) -> None:
    fe, _, image = rig
    fe.connect(order=2, queues=2, persistent=persistent)
    image.slow.update({0, 4096 * 512})
    early0, early1, late = fe.share(10), fe.share(10), fe.share(10)
    early0.buf[:NBYTES] = b"\x22" * NBYTES
    early1.buf[:NBYTES] = b"\x33" * NBYTES
    late.buf[:NBYTES] = b"\x44" * NBYTES
    w_early1, _ = fe.data_request(BLKIF_OP_WRITE, 4096, early1.refs, NBYTES)
    fe.submit([w_early1], 1)  # queue 1: a slow write in flight
    time.sleep(0.05)
    w_early0, _ = fe.data_request(BLKIF_OP_WRITE, 0, early0.refs, NBYTES)
    barrier = blkif.encode_request(Request(BLKIF_OP_WRITE_BARRIER, 0, fe.new_id(), 0, ()), fe.abi)
    w_late, _ = fe.data_request(BLKIF_OP_WRITE, 2048, late.refs, NBYTES)
    fe.submit([w_early0, barrier, w_late], 0)
    responses = fe.collect(3, 0, timeout=10) + fe.collect(1, 1, timeout=10)
    assert all(r.status == BLKIF_RSP_OKAY for r in responses)
    ids0 = [blkif.decode_request_header(s, fe.abi).id for s in (w_early0, barrier, w_late)]
    assert [r.id for r in responses[:3]] == ids0  # the barrier orders its ring's responses
    flushes = [t for w, _, t in image.events if w == "flush"]
    assert len(flushes) == 2  # before and after the barrier (it may carry data)
    assert flushes[0] > _event(image, "write-end", 0)  # its own ring's earlier write
    assert flushes[0] > _event(image, "write-end", 4096 * 512)  # and the other queue's
    assert _event(image, "write-start", 2048 * 512) > flushes[1]  # nothing starts before it ends
    content = _content(image)
    assert content[:NBYTES] == b"\x22" * NBYTES
    assert content[4096 * 512 : 4096 * 512 + NBYTES] == b"\x33" * NBYTES
    assert content[2048 * 512 : 2048 * 512 + NBYTES] == b"\x44" * NBYTES


def test_try_readv_reads_from_the_page_cache_without_waiting(tmp_path) -> None:
    path = tmp_path / "disk.img"
    data = random.Random(5).randbytes(64 * 1024)
    path.write_bytes(data)
    image = open_image(str(path))
    try:
        with open(path, "rb") as f:
            f.read()  # in the page cache now
        buf = bytearray(40 * 1024)
        views = [memoryview(buf)[: 8192], memoryview(buf)[8192:]]
        assert image.try_readv(views, 4096, len(buf)) is True
        assert bytes(buf) == data[4096 : 4096 + len(buf)]
        written = image.try_writev([memoryview(b"\x77" * 4096)], 0, 4096)
        if written:  # buffered RWF_NOWAIT writes depend on the kernel and filesystem
            assert path.read_bytes()[:4096] == b"\x77" * 4096
        image._nowait_ok = False  # a kernel that cannot tell: the read is done, waiting
        buf[:] = bytes(len(buf))
        assert image.try_readv(views, 8192, len(buf)) is True
        assert bytes(buf) == data[8192 : 8192 + len(buf)]
    finally:
        image.close()
