"""blkback in its own process over the software Xen, driven by a minimal clean frontend
(tests/hostile_frontend.RawFrontend, written on the core ring and blkif codecs): I/O of every
kind, every negotiated dimension, read-only mode, large sectors, persistent grants, discard,
the conformance report, ring overflow, frontend death, detach and SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hostile_frontend import BackendProcess, RawFrontend
from xentools.core.blkif import (
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    VDISK_READONLY,
)
from xentools.core.xenbus import XenbusState
from xentools.devices.toolstack import create_vbd, destroy_vbd
from xentools.platform.sim.grantd import query_state
from xentools.platform.sim.launcher import SoftwareXen

MiB = 1 << 20
FRONTEND = 1
XEN_DOMAINS = (0, FRONTEND)  # the software Xen of the fresh_xen fixture (tests/conftest.py)


class Vbd:
    """A software Xen with domains 0 and 1, an image and a vbd; the backend starts on demand."""

    def __init__(self, xen: SoftwareXen, size: int = 8 * MiB) -> None:
        self.xen = xen
        self.image = os.path.join(xen.root_dir, "disk.img")
        self.content = bytearray(random.Random(1).randbytes(size))
        with open(self.image, "wb") as f:
            f.write(self.content)
        self.xs = xen.platform(0).open_xenstore()
        self.paths = create_vbd(self.xs, backend_domid=0, frontend_domid=FRONTEND, devid=51712,
                                params=self.image)
        self.backend: BackendProcess | None = None
        self.frontends: list[RawFrontend] = []

    def start(self, *args: str) -> BackendProcess:
        self.backend = BackendProcess(self.xen.root_dir, self.paths.backend, self.image, *args)
        return self.backend

    def frontend(self) -> RawFrontend:
        fe = RawFrontend(self.xen.platform(FRONTEND), self.paths.frontend, self.paths.backend, 0)
        self.frontends.append(fe)
        return fe

    def image_bytes(self) -> bytes:
        with open(self.image, "rb") as f:
            return f.read()

    def backend_maps(self) -> int:
        """Pages domain 0 has mapped, per grantd."""
        state = query_state(self.xen.grantd_path)
        return sum(len(m["refs"]) for m in state["maps"] if m["domid"] == 0)

    def backend_ports(self) -> int:
        state = query_state(self.xen.grantd_path)
        return sum(1 for p in state["ports"] if p["domid"] == 0)

    def close(self) -> None:
        for fe in self.frontends:
            fe.close()
        if self.backend is not None and self.backend.alive():
            self.backend.stop(signal.SIGKILL)
        self.xs.close()


@pytest.fixture
def vbd(fresh_xen):
    v = Vbd(fresh_xen)
    try:
        yield v
    finally:
        v.close()


def finish(vbd: Vbd, fe: RawFrontend) -> dict:
    """Close the frontend, SIGTERM the backend; return the report it wrote."""
    fe.disconnect()
    assert vbd.backend is not None
    assert vbd.backend.stop() == 0, vbd.backend.stderr()
    report = vbd.backend.read_report()
    assert vbd.backend.stdout() == ""  # the report goes to stdout only with --report -
    assert "Traceback" not in vbd.backend.stderr()
    return report


def exercise(vbd: Vbd, fe: RawFrontend, rng: random.Random, queues: int = 1, unit: int = 512) -> None:
    """Verified writes and reads, direct and indirect, on every queue."""
    sectors_per_page = 4096 // unit
    for queue in range(queues):
        for nbytes in (unit, 4096, 11 * 4096, 12 * 4096, 64 * 4096):
            sector = rng.randrange(0, len(vbd.content) // unit - nbytes // unit)
            data = rng.randbytes(nbytes)
            assert fe.write(sector, data, queue, unit).status == BLKIF_RSP_OKAY
            vbd.content[sector * unit : sector * unit + nbytes] = data
            rsp, back = fe.read(sector, nbytes, queue, unit)
            assert rsp.status == BLKIF_RSP_OKAY and back == data
        # An unaligned read spanning page boundaries: sectors 3..(3+sectors_per_page*2).
        if sectors_per_page > 1:
            rsp, back = fe.read(3, 2 * 4096, queue, unit)
            assert back == bytes(vbd.content[3 * unit : 3 * unit + 2 * 4096])
    assert vbd.image_bytes() == vbd.content


@pytest.mark.parametrize(
    "order,queues,protocol,persistent,backend_args",
    [
        (0, 1, None, False, []),
        (4, 1, "x86_32-abi", True, []),
        (2, 4, "x86_64-abi", True, ["--no-persistent"]),
        (1, 2, "x86_32-abi", False, ["--max-indirect-segments", "4096"]),
        (3, 3, None, True, ["--max-persistent-grants", "8"]),
    ],
)
def test_clean_frontend_gets_its_data_and_an_empty_report(vbd, order, queues, protocol, persistent, backend_args) -> None:
    vbd.start(*backend_args)
    fe = vbd.frontend()
    fe.connect(order=order, queues=queues, protocol=protocol, persistent=persistent)
    assert fe.disk is not None and fe.disk.sectors == len(vbd.content) // 512 and fe.disk.sector_size == 512
    assert not fe.disk.info & VDISK_READONLY
    assert fe.features.max_ring_page_order == 4 and fe.features.multi_queue_max_queues == 4
    exercise(vbd, fe, random.Random(order * 10 + queues), queues)
    for queue in range(queues):
        assert fe.flush(queue).status == BLKIF_RSP_OKAY
        assert fe.flush(queue, op=BLKIF_OP_WRITE_BARRIER).status == BLKIF_RSP_OKAY
    report = finish(vbd, fe)
    mine = report["frontends"][vbd.paths.frontend]
    assert report["total"] == 0 and mine["violations"] == {} and mine["connects"] == 1, mine
    # The clean frontend is in the report with what was checked, as it negotiated it.
    ops = mine["requests"]["by_operation"]
    assert ops["write"]["direct"] > 0 and ops["read"]["direct"] > 0 and ops["flush"]["direct"] == queues
    assert ops["read"]["indirect"] > 0 and ops["write"]["indirect"] > 0  # 12 and 64 pages: indirect
    assert mine["requests"]["rejected"] == 0 and report["requests"] == mine["requests"]["accepted"]
    assert mine["features"]["queues"] == queues and mine["features"]["ring-page-order"] == order
    assert mine["rules_exercised"]["segment.last_sect"] > 0 and mine["bytes"]["written"] > 0


def test_flush_and_barrier_with_data_and_many_in_flight(vbd) -> None:
    vbd.start()
    fe = vbd.frontend()
    fe.connect(order=2, queues=2)
    pages = fe.share(1)
    pages.buf[:4096] = b"\x5a" * 4096
    from xentools.core import blkif

    slots = []
    for i in range(40):  # a whole batch in flight before one notification
        slots.append(blkif.encode_request(blkif.Request(BLKIF_OP_FLUSH_DISKCACHE if i % 2 else BLKIF_OP_WRITE_BARRIER,
                                                        0, 1000 + i, 8 * i, (blkif.Segment(pages.refs[0], 0, 7),)), fe.abi))
    for queue in (0, 1):
        fe.submit(slots[queue * 20 : queue * 20 + 20], queue)
    for queue in (0, 1):
        responses = fe.collect(20, queue)
        assert sorted(r.id for r in responses) == list(range(1000 + 20 * queue, 1020 + 20 * queue))
        assert all(r.status == BLKIF_RSP_OKAY for r in responses)
    assert vbd.image_bytes()[: 40 * 4096] == b"\x5a" * (40 * 4096)
    fe.unshare(pages)
    assert finish(vbd, fe)["total"] == 0


def test_discard_punches_a_hole(vbd) -> None:
    vbd.start()
    fe = vbd.frontend()
    fe.connect()
    assert fe.features.feature_discard and fe.features.discard_granularity == 512
    assert fe.features.discard_alignment == 0 and not fe.features.discard_secure
    before = os.stat(vbd.image).st_blocks
    assert fe.discard(2048, 2048).status == BLKIF_RSP_OKAY  # 1 MiB at 1 MiB
    fd = os.open(vbd.image, os.O_RDONLY)
    try:
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB
    finally:
        os.close(fd)
    assert os.stat(vbd.image).st_blocks < before
    rsp, back = fe.read(2048, 8192)
    assert rsp.status == BLKIF_RSP_OKAY and back == bytes(8192)
    image = vbd.image_bytes()
    assert image[:MiB] == vbd.content[:MiB] and image[2 * MiB :] == vbd.content[2 * MiB :]
    assert len(image) == len(vbd.content)
    assert fe.discard(0, 8, secure=True).status == BLKIF_RSP_EOPNOTSUPP  # discard-secure is 0
    report = finish(vbd, fe)
    assert report["frontends"][vbd.paths.frontend]["violations"] == {"discard.secure_not_advertised": 1}


def test_read_only_mode(vbd) -> None:
    vbd.start("--read-only")
    fe = vbd.frontend()
    fe.connect(persistent=True)
    assert fe.disk.info & VDISK_READONLY and not fe.features.feature_discard
    rsp, back = fe.read(0, 8192)
    assert rsp.status == BLKIF_RSP_OKAY and back == vbd.content[:8192]
    assert fe.write(0, b"\x01" * 4096).status == BLKIF_RSP_ERROR
    assert fe.write(16, b"\x01" * 48 * 1024).status == BLKIF_RSP_ERROR  # indirect write
    assert fe.discard(0, 8).status == BLKIF_RSP_EOPNOTSUPP
    assert fe.flush().status == BLKIF_RSP_OKAY  # nothing to flush, nothing written
    assert vbd.image_bytes() == vbd.content
    report = finish(vbd, fe)
    assert report["frontends"][vbd.paths.frontend]["violations"] == {
        "discard.not_advertised": 1, "request.readonly_write": 2}


def test_toolstack_mode_r_is_read_only(vbd) -> None:
    vbd.xs.write(f"{vbd.paths.backend}/mode", "r")
    vbd.start()
    fe = vbd.frontend()
    fe.connect()
    assert fe.disk.info & VDISK_READONLY
    assert fe.write(0, b"\x01" * 512).status == BLKIF_RSP_ERROR
    finish(vbd, fe)
    assert vbd.image_bytes() == vbd.content


@pytest.fixture
def vbd4k(fresh_xen):
    v = Vbd(fresh_xen, size=4 * MiB)
    try:
        yield v
    finally:
        v.close()


def test_large_sector_size(vbd4k) -> None:
    vbd = vbd4k
    vbd.start("--sector-size", "4096")
    fe = vbd.frontend()
    fe.connect(large_sectors=True, protocol="x86_32-abi")
    assert (fe.disk.sector_size, fe.disk.sectors, fe.disk.physical_sector_size) == (4096, 1024, 4096)
    exercise(vbd, fe, random.Random(7), unit=4096)
    # In 4096-byte sectors a segment holds exactly one: last_sect 1 breaks the frame.
    from xentools.core import blkif

    pages = fe.share(1)
    bad = blkif.encode_request(blkif.Request(0, 0, 5, 0, (blkif.Segment(pages.refs[0], 0, 1),)), fe.abi)
    assert fe.roundtrip(bad).status == BLKIF_RSP_ERROR
    fe.unshare(pages)
    report = finish(vbd, fe)
    assert report["frontends"][vbd.paths.frontend]["violations"] == {"segment.last_sect": 1}


def test_large_sector_image_for_a_512_frontend(vbd4k) -> None:
    vbd = vbd4k
    vbd.start("--sector-size", "4096")
    fe = vbd.frontend()
    fe.connect(large_sectors=False)
    assert (fe.disk.sector_size, fe.disk.sectors, fe.disk.physical_sector_size) == (512, 8192, 4096)
    exercise(vbd, fe, random.Random(8))
    assert finish(vbd, fe)["total"] == 0


def test_persistent_grants_are_bounded_and_freed(vbd) -> None:
    vbd.start("--max-persistent-grants", "16")
    fe = vbd.frontend()
    fe.connect(order=0, queues=1, persistent=True)
    pool = fe.share(11)
    rng = random.Random(3)
    for _ in range(3):  # the same 11 pages again and again: mapped once
        data = rng.randbytes(11 * 4096)
        assert fe.write(0, data, pages=pool).status == BLKIF_RSP_OKAY
        assert fe.read(0, 11 * 4096, pages=pool)[1] == data
    assert vbd.backend_maps() == 1 + 11  # the ring and the cached pages
    for _ in range(6):  # fresh pages each time: the cache stays at its bound
        assert fe.write(8, rng.randbytes(8192)).status == BLKIF_RSP_OKAY
        assert vbd.backend_maps() <= 1 + 16
    fe.disconnect()
    assert vbd.backend_maps() == 0 and vbd.backend_ports() == 0
    fe.reconnect_ready()
    fe.connect(persistent=True)
    assert fe.read(0, 4096)[0].status == BLKIF_RSP_OKAY
    assert finish(vbd, fe)["total"] == 0
    assert vbd.backend_maps() == 0


# With persistent grants the ring is served by the compiled loop's pass where it is built
# (xt_pass stops at the overflow and the Python BackRing judges it), without by the Python path.
@pytest.mark.parametrize("persistent", [False, True], ids=["python-path", "compiled-pass"])
def test_ring_overflow_closes_the_ring_and_is_reported(vbd, persistent) -> None:
    vbd.start()
    fe = vbd.frontend()
    fe.connect(order=1, persistent=persistent)
    ring = fe.rings[0]
    ring.shared.req_prod = ring.req_prod_pvt + ring.size + 1
    fe.evtchn.notify(fe.ports[0])
    assert fe.wait_backend({XenbusState.Closing}) == XenbusState.Closing
    fe.disconnect()
    assert vbd.backend_maps() == 0
    # The backend survives and serves the next connection.
    fe.reconnect_ready()
    fe.connect()
    assert fe.read(0, 4096)[1] == vbd.content[:4096]
    report = finish(vbd, fe)
    assert report["frontends"][vbd.paths.frontend]["violations"] == {"ring.req_overflow": 1}


def test_bad_handshake_keys_close_the_device_and_are_reported(vbd) -> None:
    vbd.start("--max-queues", "2")
    fe = vbd.frontend()
    fe.connect(queues=2, edit_keys=lambda k: {**k, "multi-queue-num-queues": "3"}, expect_connected=False)
    fe.disconnect()
    fe.reconnect_ready()
    fe.connect(edit_keys=lambda k: {**k, "protocol": "arm-abi"}, expect_connected=False)
    fe.disconnect()
    fe.reconnect_ready()
    fe.connect(edit_keys=lambda k: {key: v for key, v in k.items() if key != "ring-ref"}, expect_connected=False)
    fe.disconnect()
    fe.reconnect_ready()
    fe.connect()
    assert fe.read(0, 512)[1] == vbd.content[:512]
    violations = finish(vbd, fe)["frontends"][vbd.paths.frontend]["violations"]
    assert violations == {
        "frontend.multi-queue-num-queues.range": 1,
        "protocol.unknown": 1,
        "frontend.ring-ref.missing": 1,
    }


def test_sigusr1_writes_the_report_while_serving(vbd) -> None:
    backend = vbd.start()
    fe = vbd.frontend()
    fe.connect()
    assert fe.discard(0, 8, secure=True).status == BLKIF_RSP_EOPNOTSUPP
    backend.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not os.path.exists(backend.report):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert backend.read_report()["total"] == 1 and backend.alive()
    finish(vbd, fe)


FRONTEND_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[4])
    from hostile_frontend import RawFrontend
    from xentools.platform.sim.platform import SoftwarePlatform
    fe = RawFrontend(SoftwarePlatform(sys.argv[1], 1), sys.argv[2], sys.argv[3], 0)
    fe.connect(order=2, queues=2, persistent=True)
    assert fe.write(0, b"x" * 65536).status == 0
    print("connected", flush=True)
    time.sleep(60)
""")


def test_backend_survives_the_frontend_process_dying(vbd) -> None:
    backend = vbd.start()
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.Popen(
        [sys.executable, "-c", FRONTEND_SCRIPT, vbd.xen.root_dir, vbd.paths.frontend, vbd.paths.backend, tests_dir],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "connected"
        assert vbd.backend_maps() > 0
        child.kill()
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    time.sleep(0.2)
    assert backend.alive()
    vbd.xs.release(FRONTEND)  # the toolstack notices the domain is gone
    fe_watch = RawFrontend(vbd.xen.platform(0), vbd.paths.frontend, vbd.paths.backend, 0)
    vbd.frontends.append(fe_watch)
    assert fe_watch.wait_backend({XenbusState.Closed}) == XenbusState.Closed
    assert vbd.backend_maps() == 0 and vbd.backend_ports() == 0
    assert backend.alive()
    assert backend.stop() == 0
    assert "Traceback" not in backend.stderr()


def test_backend_exits_when_the_vbd_is_removed(vbd) -> None:
    backend = vbd.start()
    fe = vbd.frontend()
    fe.connect()
    destroy_vbd(vbd.xs, vbd.paths)
    assert backend.wait(10) == 0
    assert not vbd.xs.exists(vbd.paths.backend)  # and did not recreate its directory
    assert vbd.backend_maps() == 0 and vbd.backend_ports() == 0


def test_detach_with_online_zero(vbd) -> None:
    backend = vbd.start()
    fe = vbd.frontend()
    fe.connect()
    vbd.xs.write(f"{vbd.paths.backend}/online", "0")
    assert fe.wait_backend({XenbusState.Closing}) == XenbusState.Closing
    fe.disconnect()
    assert backend.wait(10) == 0
    assert vbd.xs.read(f"{vbd.paths.backend}/state") == b"6"


def test_sigterm_while_connected_unmaps_then_closes(vbd) -> None:
    backend = vbd.start()
    fe = vbd.frontend()
    fe.connect(order=3, queues=4, persistent=True)
    exercise(vbd, fe, random.Random(5), queues=4)
    assert backend.stop() == 0
    assert fe.backend_state() == XenbusState.Closed
    assert vbd.backend_maps() == 0 and vbd.backend_ports() == 0


def test_device_gate_barrier_waits_for_every_queue() -> None:
    """A WRITE_BARRIER takes every queue's lock: it runs only when no request of any queue
    is in flight, and requests of other queues wait for it."""
    import threading

    from xentools.devices.blkback_queue import DeviceGate

    gate = DeviceGate(3)
    order: list[str] = []
    gate.locks[2].acquire()  # queue 2 has a request in flight
    barrier = threading.Thread(target=lambda: (gate.acquire_all(), order.append("barrier"), gate.release_all()))
    barrier.start()
    time.sleep(0.05)
    assert order == [] and barrier.is_alive()
    order.append("queue 2 done")
    gate.locks[2].release()
    barrier.join(5)
    assert order == ["queue 2 done", "barrier"]
    for lock in gate.locks:  # all released again
        assert lock.acquire(blocking=False)
        lock.release()
