"""The compiled ring loop against the pure-Python path: the same random and hostile rings fed
to both must give the same responses, the same data (image and frontend pages) and the same
conformance report.

Two blkback queues (QueueWorker) run in this process over the software Xen, each on its own
ring and its own copy of one image, both serving the same frontend data pages (persistent
grants). One uses the compiled loop (xentools/devices/blkback_ringloop.c, built by
`make`), the other is told not to. Each ring state, a batch of 1..8 request slots drawn from
valid READ/WRITE requests, the same with one field broken (operation, nr_segments, first/last
sector, sector past the disk or near 2**64, an ungranted ref), flushes, barriers, discards,
indirect requests and random bytes, is written to both rings; the queue serves it
(`_serve_ring`, no threads: every request completes inside the call), and the responses each
frontend ring then holds are compared (as a multiset: blkif lets a backend answer in any
order, and the Python path answers a batch's rejected requests before the others). The frontend pages are restored between
the two runs of a state (a WRITE reads them) and compared after. Both ABIs, each with a
writable disk and a cache that holds every pool page, and with a read-only disk and a cache
smaller than the pool, each with both ways the loop reads (copied from mapped windows, preadv
straight into the granted pages): 2,500 states each, 10,000 per way, 20,000 in all; each prints
how many requests the compiled loop served, by kind.

Ring-index attacks (a producer overflowing the ring): the compiled pass (xt_pass) stops
without consuming and BackRing judges req_prod, as on the Python path; tests/test_blkback_hostile.py
covers them (tests/test_blkback_raw_frontend.py sends one to a blkback process).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xentools.core import blkif
from xentools.core.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    PAGE_SIZE,
    codec_for,
)
from xentools.core.ring import RING_HEADER_SIZE, FrontRing, SharedRing, ring_entries
from xentools.devices.blkback_conformance import ConformanceReport
from xentools.devices.blkback_image import open_image
from xentools.devices.blkback_queue import DeviceGate, QueueWorker
from xentools.devices import blkback_ringloop
from xentools.devices.blkback_ringloop import compiled, evt_of, layout_of
from xentools.devices.blkback_validate import RequestPolicy
from xentools.platform.sim.launcher import SoftwareXen

STATES = 2500  # per case: 10,000 in all
POOL = 16  # frontend pages both queues serve
INDIRECT_FROM = 12  # pool pages from here on serve as indirect pages only
DISK = 1 << 20
FRONTEND = "/local/domain/1/device/vbd/51712"
SEED = int(os.environ.get("RINGLOOP_SEED", "20261127"))


class Side:
    """One queue over its own ring and image, serving the shared pool pages."""

    def __init__(self, xen: SoftwareXen, abi, policy: RequestPolicy, image_path: str, use_compiled: bool, cache: int) -> None:  # type: ignore[no-untyped-def]
        fe = xen.platform(1)
        self.gntshr = fe.open_gntshr()
        self.evtchn = fe.open_evtchn()
        self.ring_pages = self.gntshr.share(0, 1, True)
        nr_ents = ring_entries(0, abi.entry_size)
        self.front = FrontRing.create(SharedRing(self.ring_pages.buf, abi.entry_size, nr_ents), fe.full_barrier)
        self.port = self.evtchn.bind_unbound(0)
        self.response_size = abi.response_size
        self.report = ConformanceReport()
        self.image = open_image(image_path, read_only=policy.readonly) if policy.readonly else open_image(image_path)
        self.worker = QueueWorker(
            index=0, platform=xen.platform(0), frontend_id=1, ring_refs=tuple(self.ring_pages.refs),
            event_channel=self.port, abi=abi, policy=policy, image=self.image, gate=DeviceGate(1),
            log_to=self.report.frontend(FRONTEND), persistent=True, max_persistent=cache,
            io_threads=0, ringloop=use_compiled,
        )

    def serve(self, slots: list[bytes]) -> list[bytes]:
        for slot in slots:
            self.front.put_request(slot)
        self.front.push_requests_and_check_notify()
        self.worker._serve_ring()  # noqa: SLF001 - the ring thread's step, run here
        out = []
        for _ in range(self.front.unconsumed_responses()):
            out.append(self.front.get_response()[: self.response_size])  # the rest is the request's
        return out

    def close(self) -> None:
        self.worker.stop()
        self.image.close()
        self.evtchn.close()
        self.gntshr.unshare(self.ring_pages)
        self.gntshr.close()


class Generator:
    """Random and hostile request slots for one ABI, on the pool's refs."""

    def __init__(self, rng: random.Random, abi, refs: list[int], indirect_refs: list[int],  # type: ignore[no-untyped-def]
                 policy: RequestPolicy, ungranted: int) -> None:
        self.ungranted = ungranted  # refs from here up are granted to no one (not even a ring)
        self.rng = rng
        self.abi = abi
        self.codec = codec_for(abi)
        self.refs = refs
        # Indirect pages are never read into: the Python path reads a batch's indirect pages
        # before it runs the batch's reads, the compiled loop runs reads as it goes, and a
        # frontend that reads into a page it also names as an indirect page gets either.
        self.indirect_refs = indirect_refs
        self.units = DISK // policy.unit
        self.per_page = PAGE_SIZE // policy.unit
        self.next_id = 0

    def req_id(self) -> int:
        rng = self.rng
        self.next_id += 1
        return rng.choice((self.next_id, rng.getrandbits(64), 0, (1 << 64) - 1))

    def ref(self, refs: list[int] | None = None) -> int:
        rng = self.rng
        if rng.random() < 0.03:
            return rng.choice((0, rng.getrandbits(32) | 0x10000, 0xFFFFFFFF, self.ungranted + rng.randrange(50)))
        return rng.choice(refs or self.refs)

    def segments(self, n: int, broken: str | None) -> list[tuple[int, int, int]]:
        rng = self.rng
        segs = []
        for _ in range(n):
            first = rng.randrange(self.per_page)
            last = rng.randrange(first, self.per_page)
            if rng.random() < 0.5:
                first, last = 0, self.per_page - 1
            segs.append((self.ref(), first, last))
        if broken and segs:
            i = rng.randrange(len(segs))
            gref, first, last = segs[i]
            if broken == "last":
                last = rng.randrange(self.per_page, 256)
            elif broken == "first":
                first, last = (rng.randrange(1, self.per_page), 0) if self.per_page > 1 else (1, 0)
            elif broken == "gref":
                gref = rng.choice((0x7FFFFFF0, rng.getrandbits(32) | 0x10000))
            segs[i] = (gref, first, last)
        return segs

    def rw(self) -> bytes:
        rng = self.rng
        op = rng.choice((BLKIF_OP_READ, BLKIF_OP_WRITE))
        n = rng.randrange(1, 12)
        broken = rng.choice((None,) * 6 + ("last", "first", "gref", "nseg", "sector", "op", "huge"))
        segs = self.segments(n, broken if broken in ("last", "first", "gref") else None)
        units = sum(last - first + 1 for _, first, last in segs)
        sector = rng.randrange(max(1, self.units - units + 1))
        if broken == "sector":
            sector = rng.choice((self.units - units + 1 + rng.randrange(8), self.units, rng.getrandbits(40)))
        elif broken == "huge":
            sector = rng.choice(((1 << 64) - 1, (1 << 64) - units, (1 << 63) // 8 + 1, (1 << 64) // 512))
        nr = n
        if broken == "nseg":
            nr = rng.choice((0, 12, 13, 255))
            segs = (segs * 24)[: min(nr, 11)]
        if broken == "op":
            op = rng.choice((7, 8, 9, 200, 255, BLKIF_OP_INDIRECT))
        raw = self.codec.pack_segments(segs)
        return self._with_nr(self.codec.rw_request(op, 0, self.req_id(), sector & ((1 << 64) - 1), raw, len(segs)), nr)

    def _with_nr(self, slot: bytearray, nr: int) -> bytes:
        slot[self.abi.req_nr_segments] = nr
        return bytes(slot)

    def flush(self) -> bytes:
        rng = self.rng
        op = rng.choice((BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER))
        n = rng.choice((0, 0, 0, 1, 2, 12))
        segs = self.segments(min(n, 11), None)
        slot = self.codec.rw_request(op, 0, self.req_id(), rng.randrange(self.units), self.codec.pack_segments(segs), len(segs))
        return self._with_nr(slot, n)

    def discard(self) -> bytes:
        rng = self.rng
        sector = rng.choice((rng.randrange(self.units), self.units, (1 << 64) - 1))
        slot = bytearray(self.codec.discard_request(0, self.req_id(), sector, rng.randrange(64), rng.random() < 0.3))
        if rng.random() < 0.2:
            slot[self.abi.discard_flag] = rng.randrange(256)
        return bytes(slot)

    def indirect(self) -> bytes:
        rng = self.rng
        n = rng.choice((1, 8, 16, 33, 4096, 5000, 0))
        grefs = [self.ref(self.indirect_refs) for _ in range(blkif.indirect_pages_for(max(1, min(n, 4096))))]
        inner = rng.choice((BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_READ, 5))
        sector = rng.randrange(self.units)
        slot = bytearray(self.codec.indirect_request(BLKIF_OP_READ, 0, self.req_id(), sector, min(n, 4096), grefs))
        slot[self.abi.indirect_indirect_op] = inner
        struct.pack_into("<H", slot, self.abi.indirect_nr_segments, n & 0xFFFF)
        return bytes(slot)

    def garbage(self) -> bytes:
        slot = bytearray(self.rng.randbytes(self.abi.request_size))
        if self.rng.random() < 0.5:
            slot[self.abi.req_operation] = self.rng.choice((BLKIF_OP_READ, BLKIF_OP_WRITE))
        return bytes(slot)

    def slot(self) -> bytes:
        pick = self.rng.random()
        if pick < 0.75:
            return self.rw()
        if pick < 0.83:
            return self.flush()
        if pick < 0.88:
            return self.discard()
        if pick < 0.93:
            return self.indirect()
        return self.garbage()


def _differences(a: dict, b: dict, where: str = "") -> list[str]:
    """Where two report dicts differ: "path: compiled value != python value" lines."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out += _differences(left, right, f"{where}/{key}")
        elif left != right:
            out.append(f"{where}/{key}: {left!r} != {right!r}")
    return out


# Each ABI with a writable disk and a cache that holds every pool page (every kind of request
# reaches the compiled loop), and with a read-only disk and a smaller cache (evictions,
# overflows, refs mapped for one request only).
# Each case with both ways the loop reads (blkback_ringloop.READS): copied from mapped windows,
# and preadv straight into the granted pages.
@pytest.mark.parametrize("reads", ["windows", "preadv"])
@pytest.mark.parametrize(
    "abi,readonly,cache",
    [(blkif.X86_64, False, 32), (blkif.X86_64, True, 10), (blkif.X86_32, False, 32), (blkif.X86_32, True, 14)],
    ids=["x86_64-rw", "x86_64-ro-small-cache", "x86_32-rw", "x86_32-ro-small-cache"],
)
def test_compiled_loop_answers_as_the_python_path(abi, readonly, cache, reads, tmp_path, capsys,
                                                  monkeypatch) -> None:
    module = compiled()
    assert module is not None, (
        "the compiled ring loop is not built: run `make venv` (it runs bindings/build_ringloop.py;"
        " needs gcc) or unset XENTOOLS_RINGLOOP=python"
    )
    monkeypatch.setattr(blkback_ringloop, "READS", reads)
    rng = random.Random(SEED + 2 * readonly + (abi is blkif.X86_32))
    content = rng.randbytes(DISK)
    paths = []
    for name in ("compiled.img", "python.img"):
        path = tmp_path / name
        path.write_bytes(content)
        paths.append(str(path))
    policy = RequestPolicy(
        disk_bytes=DISK, readonly=readonly, max_indirect_segments=32,
        discard=not readonly, discard_secure=False,
    )
    with SoftwareXen(domains=(0, 1)) as xen:
        pool_sharer = xen.platform(1).open_gntshr()
        pool = pool_sharer.share(0, POOL, True)
        pool.buf[:] = rng.randbytes(POOL * PAGE_SIZE)
        fast = Side(xen, abi, policy, paths[0], True, cache)
        slow = Side(xen, abi, policy, paths[1], False, cache)
        try:
            assert fast.worker.compiled and not slow.worker.compiled
            rings = list(fast.ring_pages.refs) + list(slow.ring_pages.refs)
            refs = list(pool.refs)
            data_refs, indirect_refs = refs[:INDIRECT_FROM], refs[INDIRECT_FROM:]
            gen = Generator(rng, abi, data_refs, indirect_refs, policy, max(rings + refs) + 1)
            # The first indirect page: valid segments on the data pages; the others random.
            segs = [(rng.choice(data_refs), 0, rng.randrange(gen.per_page)) for _ in range(PAGE_SIZE // 8)]
            at = INDIRECT_FROM * PAGE_SIZE
            pool.buf[at : at + PAGE_SIZE] = codec_for(blkif.X86_64).pack_segments(segs)
            answered = 0
            for state in range(STATES):
                slots = [gen.slot() for _ in range(rng.randrange(1, 9))]
                before = bytes(pool.buf)
                got_fast = fast.serve(slots)
                after_fast = bytes(pool.buf)
                pool.buf[:] = before
                got_slow = slow.serve(slots)
                # The same responses; their order may differ (blkif allows any: the Python
                # path answers a batch's rejected requests before it starts the others).
                assert sorted(got_fast) == sorted(got_slow), (state, slots, got_fast, got_slow)
                assert len(got_fast) == len(slots), (state, len(got_fast), len(slots))
                assert bytes(pool.buf) == after_fast, f"state {state}: the frontend pages differ"
                answered += len(slots)
            totals = fast.worker._fast.totals  # noqa: SLF001
            mapped_reads = fast.worker._fast.profile["mapped_reads"]  # noqa: SLF001
            with capsys.disabled():
                print(f"\nringloop {abi.name} ({reads}): {STATES} ring states, {answered} requests, "
                      f"{fast.worker.compiled_served} served by the compiled loop {totals}, "
                      f"{mapped_reads} reads copied from mapped windows")
            assert fast.worker._fast.reads == {"reads": reads, "how": "set"}  # noqa: SLF001
            if reads == "windows":
                assert mapped_reads > 0  # the image is a plain file: reads come from its mapping
            else:
                assert mapped_reads == 0 and fast.worker._fast.mapped_windows == 0  # noqa: SLF001
            assert fast.worker.compiled_served > answered // 20, (fast.worker.compiled_served, answered)
            # Each kind the loop serves was served by it (with every page cached; else direct
            # reads at least).
            kinds = [(BLKIF_OP_READ, BLKIF_OP_READ)]
            if cache >= POOL:
                kinds += [(BLKIF_OP_INDIRECT, BLKIF_OP_READ), (BLKIF_OP_WRITE, BLKIF_OP_WRITE),
                          (BLKIF_OP_INDIRECT, BLKIF_OP_WRITE)]
            assert slow.worker.compiled_served == 0
            report_fast = fast.report.as_dict()["frontends"][FRONTEND]
            report_slow = slow.report.as_dict()["frontends"][FRONTEND]
            assert report_fast == report_slow, _differences(report_fast, report_slow)
            assert all(totals.get(kind) for kind in kinds), (totals, report_fast["requests"]["by_operation"]["read"])
            assert report_fast["requests"]["checked"] == answered
            assert report_fast["total"] > 0 and report_fast["requests"]["accepted"] > 0
        finally:
            fast.close()
            slow.close()
            pool_sharer.unshare(pool)
            pool_sharer.close()
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read(), "the images differ"


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=["x86_64", "x86_32"])
def test_the_loop_takes_every_offset_from_the_one_codec(abi) -> None:
    """struct xt_layout is filled from core/blkif.py's Abi, field by field: the C code holds no
    layout of its own (its only numbers are the ring header and page size of ring.h)."""
    module = compiled()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    layout = layout_of(module, abi)
    fields = [name for name, _ in module.ffi.typeof("struct xt_layout").fields]
    assert fields and all(getattr(layout, name) == getattr(abi, name) for name in fields)
    devices = Path(__file__).resolve().parent.parent / "xentools" / "devices"
    source = (devices / "blkback_ringloop.c").read_text() + (devices / "blkback_ringloop.h").read_text()
    assert "struct blkif" not in source and "#include <xen" not in source
    # Its few constants are blkif.h's and ring.h's, as the core spells them.
    defines = {name: int(value) for name, value in re.findall(r"#define XT_(\w+) (\d+)u?\b", source)}
    assert defines == {
        "PAGE": PAGE_SIZE, "HEADER": RING_HEADER_SIZE, "MAX_SEGS": blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST,
        "MAX_INDIRECT": blkif.BLKIF_MAX_INDIRECT_SEGMENTS, "IOV_MAX": 1024, "SLOT_MAX": 128,
        "OP_READ": BLKIF_OP_READ, "OP_WRITE": BLKIF_OP_WRITE, "OP_INDIRECT": BLKIF_OP_INDIRECT,
    }, defines
    assert defines["SLOT_MAX"] >= max(blkif.X86_64.entry_size, blkif.X86_32.entry_size)


def test_the_package_works_where_the_loop_is_not_built(tmp_path) -> None:
    """Without the extension module (not built: no compiler), blkback imports and compiled()
    is None, so every queue takes its pure-Python path (the path the differential test
    checks the loop against); XENTOOLS_RINGLOOP=python asks for the same."""
    script = (
        "import sys; sys.modules['xentools.devices._blkback_ringloop'] = None\n"
        "from xentools.devices import blkback, blkback_ringloop\n"
        "assert blkback_ringloop.compiled() is None\n"
        "print('pure')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "pure", result.stderr
    env = dict(os.environ, XENTOOLS_RINGLOOP="python")
    result = subprocess.run(
        [sys.executable, "-c", "from xentools.devices.blkback_ringloop import compiled; print(compiled())"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stderr


@pytest.mark.parametrize("ringloop", ["compiled", "python"])
def test_demo_verifies_every_byte_on_either_path(ringloop) -> None:
    """`xentools demo` (our blkfront, blkback in its own process, a mixed verified workload of
    direct and indirect reads and writes, persistent grants) on the compiled loop and on the
    pure-Python path: every byte read back is checked, and the image file at the end."""
    if ringloop == "compiled":
        assert compiled() is not None, "the compiled ring loop is not built: run `make venv`"
    env = {k: v for k, v in os.environ.items() if k != "XENTOOLS_RINGLOOP"}
    if ringloop == "python":
        env["XENTOOLS_RINGLOOP"] = "python"
    result = subprocess.run([sys.executable, "-m", "xentools", "demo"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "demo: OK" in result.stdout and "0 protocol violations" in result.stdout, result.stdout[-2000:]


@pytest.fixture
def windows(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Rings connected in the test read from mapped windows, whatever `auto` would measure."""
    monkeypatch.setattr(blkback_ringloop, "READS", "windows")


def _image(tmp_path: Path, name: str, seed: int) -> tuple[int, Path, bytes]:
    """(size, path, content) of a 1 MiB image of seeded random bytes; the loop must be built."""
    assert compiled() is not None, "the compiled ring loop is not built: run `make venv`"
    size = 1 << 20
    content = random.Random(seed).randbytes(size)
    image = tmp_path / name
    image.write_bytes(content)
    return size, image, content


class _MappedReads:
    """One compiled queue over `image` (a pool of 4 frontend pages): read/discard one request
    at a time and see its status, its data and the loop's mapped windows."""

    def __init__(self, xen: SoftwareXen, image: Path, size: int) -> None:
        self.abi = blkif.X86_64
        self.codec = codec_for(self.abi)
        policy = RequestPolicy(disk_bytes=size, readonly=False, max_indirect_segments=32,
                               discard=True, discard_secure=False)
        self.sharer = xen.platform(1).open_gntshr()
        self.pool = self.sharer.share(0, 4, True)
        self.side = Side(xen, self.abi, policy, str(image), True, 32)
        self.next_id = 0

    def request(self, slot: bytes) -> int:
        got = self.side.serve([slot])
        assert len(got) == 1, got
        return struct.unpack_from("<h", got[0], self.abi.rsp_status)[0]

    def read(self, sector: int) -> tuple[int, bytes]:
        """Status and data of a 4 KiB read at `sector` into pool page 0."""
        self.pool.buf[:PAGE_SIZE] = b"\xaa" * PAGE_SIZE
        status = self.request(self.read_slot(sector))
        return status, bytes(self.pool.buf[:PAGE_SIZE])

    def read_slot(self, sector: int) -> bytes:
        """A 4 KiB read at `sector` into pool page 0 (a new id)."""
        self.next_id += 1
        segs = self.codec.pack_segments([(self.pool.refs[0], 0, 7)])
        return bytes(self.codec.rw_request(BLKIF_OP_READ, 0, self.next_id, sector, segs, 1))

    def discard(self, sector: int, count: int) -> int:
        self.next_id += 1
        return self.request(self.codec.discard_request(0, self.next_id, sector, count, False))

    @property
    def fast(self):  # type: ignore[no-untyped-def]
        return self.side.worker._fast  # noqa: SLF001

    def close(self) -> None:
        self.side.close()
        self.sharer.unshare(self.pool)
        self.sharer.close()


def test_reads_come_from_mapped_windows_and_every_failure_is_answered(windows, tmp_path) -> None:
    """The compiled loop copies reads of a regular image from mapped windows of it
    (blkback_ringloop.c, struct xt_image): the data is the image's; a discard unmaps the
    windows it touched; a window that holds a hole is read with preadv instead (read through a
    mapping, a tmpfs hole would get memory); an image that shrinks under a mapping (SIGBUS in
    the copy) gets an error response from the Python path, and the backend goes on serving."""
    size, image, content = _image(tmp_path, "mapped.img", 3)
    with SoftwareXen(domains=(0, 1)) as xen:
        q = _MappedReads(xen, image, size)
        try:
            assert q.read(16) == (0, content[8192 : 8192 + PAGE_SIZE])  # the Python path caches the ref
            assert q.fast.profile["mapped_reads"] == 0 and q.fast.mapped_windows == 0
            assert q.read(16) == (0, content[8192 : 8192 + PAGE_SIZE])
            assert q.fast.profile["mapped_reads"] == 1 and q.fast.mapped_windows == 1
            assert q.read(0) == (0, content[:PAGE_SIZE])
            assert q.fast.profile["mapped_reads"] == 2 and q.side.worker.compiled_served == 2
            # The image shrinks under the mapping: the copy faults (SIGBUS), the Python path
            # answers with preadv's error, and the queue goes on.
            os.truncate(image, PAGE_SIZE)
            assert q.read(16)[0] == blkif.BLKIF_RSP_ERROR
            assert q.side.worker.fatal is None
            assert q.read(0) == (0, content[:PAGE_SIZE])
            image.write_bytes(content)
            assert q.read(16) == (0, content[8192 : 8192 + PAGE_SIZE])
            # A discard unmaps the window over it; the next read maps it again (or, where
            # the filesystem punched a hole, reads it with preadv: zeroes).
            assert q.discard(8, 8) in (0, blkif.BLKIF_RSP_EOPNOTSUPP)
            assert q.fast.mapped_windows == 0
            status, data = q.read(8)
            assert status == 0 and data in (content[4096:8192], bytes(PAGE_SIZE))
            assert q.read(0) == (0, content[:PAGE_SIZE])
        finally:
            q.close()


def test_small_reads_over_an_image_larger_than_the_windows_map_none(windows, tmp_path, monkeypatch) -> None:
    """4 KiB reads scattered over an image larger than all the windows together would map and
    unmap a window for each read (measured: a third of preadv's rate over 256 MiB): they are
    preadv's, and no window is mapped. (Reads of 64 KiB or more, or an image whose windows all
    fit, map: the test above.)"""
    assert compiled() is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkback_ringloop, "MAP_WINDOW", 64 * 1024)
    monkeypatch.setattr(blkback_ringloop, "MAP_WINDOWS", 4)  # 256 KiB of windows, 1 MiB image
    size = 1 << 20
    content = random.Random(5).randbytes(size)
    image = tmp_path / "larger.img"
    image.write_bytes(content)
    with SoftwareXen(domains=(0, 1)) as xen:
        q = _MappedReads(xen, image, size)
        try:
            for sector in (16, 16, 0, 1000, 2040):
                assert q.read(sector) == (0, content[sector * 512 : sector * 512 + PAGE_SIZE])
            assert q.side.worker.compiled_served == 4  # the first read cached the ref (Python path)
            assert q.fast.profile["mapped_reads"] == 0 and q.fast.mapped_windows == 0
        finally:
            q.close()


def test_one_window_budget_serves_every_queue_of_the_process(windows, tmp_path, monkeypatch) -> None:
    """The mapped windows are one pool for the whole process (blkback_ringloop.c, struct
    xt_pool): however many queues and images, at most MAP_WINDOWS are mapped at once (so
    blkback's resident memory is flat in the image's size and the number of queues), least
    recently used unmapped first; the queues of one image share its windows; a queue that
    closes takes its image's windows with it; every read gives the image's data."""
    module = compiled()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkback_ringloop, "MAP_WINDOW", 64 * 1024)
    monkeypatch.setattr(blkback_ringloop, "MAP_WINDOWS", 4)  # each image's four windows fit alone
    size = 256 * 1024
    contents = {name: random.Random(name).randbytes(size) for name in ("a", "b")}
    for name, content in contents.items():
        (tmp_path / f"{name}.img").write_bytes(content)

    def mapped() -> int:
        return blkback_ringloop.map_usage(module)["mapped_windows"]

    def read_windows(q: _MappedReads, name: str) -> None:
        for window in range(4):
            sector = window * 128 + 8
            assert q.read(sector) == (0, contents[name][sector * 512 : sector * 512 + PAGE_SIZE])
            assert mapped() <= 4

    with SoftwareXen(domains=(0, 1)) as xen:
        queues = {"a": _MappedReads(xen, tmp_path / "a.img", size), "a2": _MappedReads(xen, tmp_path / "a.img", size),
                  "b": _MappedReads(xen, tmp_path / "b.img", size)}
        try:
            for key, q in queues.items():  # the Python path caches the pool page's ref
                assert q.read(0) == (0, contents[key[0]][:PAGE_SIZE])
            read_windows(queues["a"], "a")
            assert mapped() == 4 and queues["a"].fast.mapped_windows == 4
            read_windows(queues["a2"], "a")  # the same image: its windows are shared
            assert mapped() == 4 and queues["a2"].fast.profile["mapped_reads"] == 4
            read_windows(queues["b"], "b")  # a's windows make room for b's
            assert mapped() == 4 and queues["b"].fast.mapped_windows == 4 and queues["a"].fast.mapped_windows == 0
            read_windows(queues["a"], "a")
            assert mapped() == 4 and queues["a"].fast.mapped_windows == 4
            shared = queues["a2"].fast
            queues.pop("a").close()  # its image's windows go with it
            assert mapped() == 0 and shared.mapped_windows == 0
            read_windows(queues["a2"], "a")
            assert mapped() == 4
        finally:
            for q in queues.values():
                q.close()
    assert mapped() == 0


def test_queues_on_threads_share_the_window_pool(windows, tmp_path, monkeypatch) -> None:
    """Two queues served at once on two threads, over two images that each fill the whole
    budget: windows are mapped, pinned, copied from and unmapped under each other's feet
    (a pinned window is never unmapped), and every read gives its image's data."""
    module = compiled()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkback_ringloop, "MAP_WINDOW", 16 * 1024)
    monkeypatch.setattr(blkback_ringloop, "MAP_WINDOWS", 4)
    size = 64 * 1024
    contents = [random.Random(seed).randbytes(size) for seed in (7, 8)]
    for n, content in enumerate(contents):
        (tmp_path / f"{n}.img").write_bytes(content)
    errors: list[str] = []

    def serve(q: _MappedReads, content: bytes, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(1500):
                sector = rng.randrange(size // 512 - 8)
                got = q.read(sector)
                if got != (0, content[sector * 512 : sector * 512 + PAGE_SIZE]):
                    errors.append(f"read at sector {sector}: status {got[0]}, data differs")
                    return
        except Exception as err:  # noqa: BLE001 - reported by the test below
            errors.append(repr(err))

    with SoftwareXen(domains=(0, 1)) as xen:
        queues = [_MappedReads(xen, tmp_path / f"{n}.img", size) for n in range(2)]
        try:
            for q, content in zip(queues, contents):
                assert q.read(0) == (0, content[:PAGE_SIZE])
            threads = [threading.Thread(target=serve, args=(q, content, n)) for n, (q, content) in
                       enumerate(zip(queues, contents))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not errors, errors
            assert all(q.fast.profile["mapped_reads"] > 0 for q in queues)
            assert blkback_ringloop.map_usage(module)["mapped_windows"] <= 4
        finally:
            for q in queues:
                q.close()


def test_a_sparse_image_is_read_without_mapping_its_holes(windows, tmp_path) -> None:
    """Windows with a hole are not mapped (on tmpfs a read fault on a hole allocates a page):
    the reads are preadv's, zeroes where the holes are, and the file gets no blocks."""
    assert compiled() is not None, "the compiled ring loop is not built: run `make venv`"
    size = 1 << 20
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    image = where / f"xentools-sparse-{os.getpid()}.img"
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        blocks = os.stat(image).st_blocks
        with SoftwareXen(domains=(0, 1)) as xen:
            q = _MappedReads(xen, image, size)
            try:
                for sector in (0, 8, 1000, 2040, 0):
                    assert q.read(sector) == (0, bytes(PAGE_SIZE))
                assert q.side.worker.compiled_served == 4
                assert q.fast.profile["mapped_reads"] == 0 and q.fast.mapped_windows == 0
            finally:
                q.close()
        assert os.stat(image).st_blocks == blocks
    finally:
        image.unlink(missing_ok=True)


# -- the compiled wait loop (xt_wait) on the software Xen's direct event channels ----------


def test_a_link_of_another_kind_is_refused_by_the_one_builder_of_struct_xt_evt() -> None:
    from types import SimpleNamespace

    module = compiled()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    with pytest.raises(ValueError, match="kind 'bits'"):
        evt_of(module.ffi, SimpleNamespace(kind="bits"), (-1, -1), None)


def test_the_xenevtchn_take_and_notify_leave_every_failure_to_python() -> None:
    """Real Xen's kind of struct xt_evt, over stand-ins for libxenevtchn's pending, unmask
    and notify (C callbacks with the library's signatures): nothing pending is "none"; our
    port is taken and unmasked; another port is left to Python in `foreign`; a failed
    pending, unmask or notify is Python's, with WAIT_UNMASK owed when only the unmask
    failed. Real Xen's own calls are tested in tests/xen/test_event_channels.py."""
    import errno
    from types import SimpleNamespace

    from xentools.devices.blkback_ringloop import WAIT_EVTCHN, WAIT_UNMASK

    module = compiled()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    ffi, lib = module.ffi, module.lib
    script = {"pending": [], "unmask": 0, "notify": 0}
    calls: list[tuple] = []

    @ffi.callback("int (*)(void *)")
    def pending(xce):  # type: ignore[no-untyped-def]
        calls.append(("pending",))
        port, err = script["pending"].pop(0)
        if port < 0:
            ffi.errno = err
        return port

    @ffi.callback("int (*)(void *, uint32_t)")
    def unmask(xce, port):  # type: ignore[no-untyped-def]
        calls.append(("unmask", port))
        return script["unmask"]

    @ffi.callback("int (*)(void *, uint32_t)")
    def notify(xce, port):  # type: ignore[no-untyped-def]
        calls.append(("notify", port))
        return script["notify"]

    def address(fn) -> int:  # type: ignore[no-untyped-def]
        return int(ffi.cast("uintptr_t", fn))

    link = SimpleNamespace(kind="xenevtchn", handle=0x1000, fd=-1, port=7, generation=0,
                           pending_fn=address(pending), unmask_fn=address(unmask), notify_fn=address(notify))
    evt = evt_of(ffi, link, (-1, -1), None)
    flags = ffi.new("uint32_t *")

    def take(*answers) -> tuple:  # type: ignore[no-untyped-def]
        script["pending"] = list(answers)
        calls.clear()
        flags[0] = 0
        return lib.xt_evt_take(evt, flags), flags[0], evt.foreign, list(calls)

    assert take((-1, errno.EAGAIN)) == (0, 0, -1, [("pending",)])
    assert take((7, 0)) == (1, 0, -1, [("pending",), ("unmask", 7)])
    assert take((9, 0)) == (-1, WAIT_EVTCHN, 9, [("pending",)])  # another port's: left masked
    evt.foreign = -1
    assert take((-1, errno.EBADF)) == (-1, WAIT_EVTCHN, -1, [("pending",)])
    script["unmask"] = -1
    assert take((7, 0)) == (-1, WAIT_EVTCHN | WAIT_UNMASK, -1, [("pending",), ("unmask", 7)])
    assert evt.events == 2  # the two of our port's events taken
    calls.clear()
    assert lib.xt_evt_notify(evt) == 0 and calls == [("notify", 7)] and evt.notifies == 1
    script["notify"] = -1
    assert lib.xt_evt_notify(evt) == -1 and evt.notifies == 1


def test_the_compiled_wait_loop_keeps_xens_event_channel_rules(tmp_path) -> None:
    """xt_wait takes, unmasks and sends the ring's events itself, with the transitions of
    evtchn_channel: a notify while it sleeps wakes it and is taken (the frontend's word
    left neither pending nor masked: a second notify delivers again), it serves what the
    event announced and notifies the frontend that asked; a wake fd ends the wait at once;
    after the frontend closes its port the loop hands the channel back to the Python handle
    (no crash, no fatal), and the queue goes on serving through the Python wait loop."""
    from xentools.platform.sim.evtchn_channel import MASKED, PENDING, READY

    size, image, content = _image(tmp_path, "wait.img", 9)
    with SoftwareXen(domains=(0, 1)) as xen:
        q = _MappedReads(xen, image, size)
        side, worker = q.side, q.side.worker
        try:
            assert q.read(8)[0] == 0  # the Python path caches the ref
            backend_evtchn = worker._evtchn  # noqa: SLF001
            while (port := backend_evtchn.pending()) is not None:  # the bind's first event
                backend_evtchn.unmask(port)
            assert worker._direct_events()  # noqa: SLF001
            fast = worker._fast  # noqa: SLF001
            link = backend_evtchn.direct_link(worker.port)
            before = fast.wait_profile
            for round_ in range(2):
                side.front.put_request(q.read_slot(16 + round_))
                side.front.push_requests_and_check_notify()
                side.front.final_check_for_responses()  # ask for an event at the next response
                side.evtchn.notify(side.port)
                served_before = worker.compiled_served
                worker._wait_compiled(300)  # noqa: SLF001 - the ring thread's step, run here
                assert worker.compiled_served == served_before + 1
                assert side.front.unconsumed_responses() == 1
                rsp = side.front.get_response()
                assert struct.unpack_from("<h", rsp, q.abi.rsp_status)[0] == 0
                assert bytes(q.pool.buf[:PAGE_SIZE]) == content[(16 + round_) * 512 : (16 + round_) * 512 + PAGE_SIZE]
                # The backend took its event and unmasked: nothing pending, masked or ready.
                word = q.side.worker._evtchn._links[worker.port].page.word(  # noqa: SLF001
                    q.side.worker._evtchn._links[worker.port].end)  # noqa: SLF001
                assert word & (PENDING | MASKED | READY) == 0, hex(word)
                assert side.evtchn.pending() == side.port  # the frontend was notified
                side.evtchn.unmask(side.port)
            after = fast.wait_profile
            assert after["events"] - before["events"] == 2 and after["notifies"] - before["notifies"] == 2
            assert link.own_word and backend_evtchn.links_changed == link.generation
            assert link.kind == "words" and fast._evt.kind == 0 and fast._evt.foreign == -1  # noqa: SLF001 - XT_EVT_WORDS
            # A wake fd ends a wait at once (a stop, a barrier elsewhere).
            worker._wake()  # noqa: SLF001
            started = time.monotonic()
            worker._wait_compiled(60_000)  # noqa: SLF001
            assert time.monotonic() - started < 30
            # The frontend closes its port: the loop leaves the channel to the Python handle,
            # which relinks; the ring is still served.
            side.evtchn.close()
            side.front.put_request(q.read_slot(24))
            side.front.push_requests_and_check_notify()
            side.front.final_check_for_responses()
            worker._wait_compiled(300)  # noqa: SLF001
            assert side.front.unconsumed_responses() == 1 and worker.fatal is None
            assert not worker._direct_events()  # noqa: SLF001 - the port is no longer bound to a peer
            side.evtchn = xen.platform(1).open_evtchn()  # for Side.close
        finally:
            q.close()


@contextlib.contextmanager
def _direct_wait(tmp_path: Path, name: str, seed: int) -> Iterator[tuple]:
    """A queue over an image `name` (content from `seed`) whose ring thread waits in xt_wait:
    one read through the Python path (it caches the ref), the bind's first event taken.
    Yields (the _MappedReads, the image's bytes, the backend's EventChannels, the compiled
    loop, its struct xt_evt)."""
    size, image, content = _image(tmp_path, name, seed)
    with SoftwareXen(domains=(0, 1)) as xen:
        q = _MappedReads(xen, image, size)
        try:
            worker = q.side.worker
            assert q.read(8)[0] == 0
            backend_evtchn = worker._evtchn  # noqa: SLF001
            while (port := backend_evtchn.pending()) is not None:
                backend_evtchn.unmask(port)
            assert worker._direct_events()  # noqa: SLF001
            fast = worker._fast  # noqa: SLF001
            yield q, content, backend_evtchn, fast, fast._evt  # noqa: SLF001
        finally:
            q.close()


def test_the_compiled_wait_loop_takes_an_event_that_comes_while_it_watches(tmp_path) -> None:
    """Before it sleeps, xt_wait watches its event word (spin_ns): a notify that comes then is
    taken without a sleep, with the same transitions as after one (word left clean, the
    request served, the frontend notified); a sleep longer than spin_max_ns halves the watch,
    and a short one grows it again, never past spin_max_ns."""
    from xentools.devices.blkback_ringloop import SPIN_US
    from xentools.platform.sim.evtchn_channel import MASKED, PENDING, READY

    with _direct_wait(tmp_path, "spin.img", 10) as (q, content, backend_evtchn, fast, evt):
        side, worker = q.side, q.side.worker
        assert evt.spin_max_ns == SPIN_US * 1000 > 0
        evt.spin_ns = 1_000_000_000  # a watch of 1 s, so the notify below comes during it
        before = fast.wait_profile
        served_before = worker.compiled_served
        waiter = threading.Thread(target=worker._wait_compiled, args=(300,))  # noqa: SLF001
        waiter.start()
        time.sleep(0.2)
        side.front.put_request(q.read_slot(40))
        side.front.push_requests_and_check_notify()
        side.front.final_check_for_responses()
        side.evtchn.notify(side.port)
        waiter.join(30)
        assert not waiter.is_alive()
        after = fast.wait_profile
        assert after["spins"] - before["spins"] == 1 and after["events"] - before["events"] == 1
        assert after["sleeps"] - before["sleeps"] == 1  # only once the second watch found nothing
        assert worker.compiled_served == served_before + 1
        assert side.front.unconsumed_responses() == 1
        rsp = side.front.get_response()
        assert struct.unpack_from("<h", rsp, q.abi.rsp_status)[0] == 0
        assert bytes(q.pool.buf[:PAGE_SIZE]) == content[40 * 512 : 40 * 512 + PAGE_SIZE]
        link = backend_evtchn._links[worker.port]  # noqa: SLF001
        assert link.page.word(link.end) & (PENDING | MASKED | READY) == 0
        assert side.evtchn.pending() == side.port
        side.evtchn.unmask(side.port)
        # That sleep lasted the timeout (300 ms > spin_max_ns): the watch was halved.
        assert evt.spin_ns == 500_000_000
        # A short sleep grows it, up to spin_max_ns.
        evt.spin_ns = 0
        side.evtchn.notify(side.port)  # a stray event: wakes the sleep at once
        worker._wake()  # noqa: SLF001
        worker._wait_compiled(300)  # noqa: SLF001
        assert 0 < evt.spin_ns <= evt.spin_max_ns


def test_the_compiled_wait_loop_does_not_watch_after_large_requests(tmp_path) -> None:
    """After a round whose requests averaged more than watch_bytes, xt_wait sleeps without
    watching its event word (the frontend answers large reads only once it has handled their
    data) and that sleep leaves the watch's length as it was; the next round of small
    requests watches again. The watch starts at its longest when events are attached."""
    from xentools.devices.blkback_ringloop import SPIN_US, WATCH_BYTES

    with _direct_wait(tmp_path, "large.img", 11) as (q, content, backend_evtchn, fast, evt):
        side, worker = q.side, q.side.worker
        assert evt.watch_bytes == WATCH_BYTES and evt.spin_ns == evt.spin_max_ns == SPIN_US * 1000

        def one_read(sector: int) -> None:
            side.front.put_request(q.read_slot(sector))
            side.front.push_requests_and_check_notify()
            side.front.final_check_for_responses()
            side.evtchn.notify(side.port)
            worker._wait_compiled(300)  # noqa: SLF001 - serves, then sleeps to the timeout
            assert side.front.unconsumed_responses() == 1
            rsp = side.front.get_response()
            assert struct.unpack_from("<h", rsp, q.abi.rsp_status)[0] == 0
            assert bytes(q.pool.buf[:PAGE_SIZE]) == content[sector * 512 : sector * 512 + PAGE_SIZE]
            while side.evtchn.pending() is not None:
                side.evtchn.unmask(side.port)

        evt.watch_bytes = PAGE_SIZE // 2  # so a 4 KiB read counts as large here
        before = fast.wait_profile
        one_read(48)
        after = fast.wait_profile
        assert evt.large == 1
        # (the notify's event, delivered before the wait, is taken after the first sleep)
        assert after["unwatched"] - before["unwatched"] >= 1 and after["spins"] == before["spins"]
        assert evt.spin_ns == SPIN_US * 1000  # a 300 ms sleep, yet not halved
        evt.watch_bytes = WATCH_BYTES  # 4 KiB is small again: the watch comes back
        before = fast.wait_profile
        one_read(56)
        after = fast.wait_profile
        assert evt.large == 0 and after["unwatched"] == before["unwatched"]
        assert evt.spin_ns == SPIN_US * 1000 // 2  # watched, then slept 300 ms: halved


def test_a_barrier_elsewhere_wakes_a_queue_waiting_in_the_compiled_loop(tmp_path, monkeypatch) -> None:
    """A queue's ring thread holds its gate lock while it serves in xt_wait; a barrier on
    another queue (DeviceGate.acquire_all) wakes it, and gets the lock at once, not at the
    wait's timeout (made 60 s here)."""
    from xentools.devices import blkback_queue

    assert compiled() is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkback_queue, "IDLE_RECHECK", 60.0)
    size = 1 << 20
    image = tmp_path / "gate.img"
    image.write_bytes(bytes(size))
    with SoftwareXen(domains=(0, 1)) as xen:
        q = _MappedReads(xen, image, size)
        worker = q.side.worker
        gate = DeviceGate(2)
        worker.gate, worker.lock = gate, gate.locks[0]
        worker._poll = 60.0  # noqa: SLF001
        try:
            assert q.read(8)[0] == 0
            worker.start()
            deadline = time.monotonic() + 20
            while worker.loop_calls == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert worker.loop_calls > 0, "the ring thread never entered the compiled wait loop"
            time.sleep(0.1)
            started = time.monotonic()
            gate.acquire_all()
            waited = time.monotonic() - started
            gate.release_all()
            assert waited < 20, waited
            # The queue still serves after the barrier.
            q.side.front.put_request(q.read_slot(0))
            q.side.front.push_requests_and_check_notify()
            q.side.evtchn.notify(q.side.port)
            deadline = time.monotonic() + 20
            while not q.side.front.unconsumed_responses() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert q.side.front.unconsumed_responses() == 1
        finally:
            q.close()


# -- how reads are done (blkback_ringloop.choose_reads) and a stale module ------------------


def test_auto_measures_both_ways_once_per_file_system_and_a_setting_wins(tmp_path, monkeypatch) -> None:
    """`auto` times preadv against a copy from a mapping of the image's first 256 KiB of data
    (xt_probe_reads) and takes the windows only where the copy is WINDOWS_SPEEDUP times faster;
    the verdict is kept per file system; an image with no run of data that long is read with
    preadv; `--reads`/$XENTOOLS_BLKBACK_READS set it, and a wrong value is refused."""
    module = compiled()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    monkeypatch.setattr(blkback_ringloop, "READS", None)
    monkeypatch.delenv(blkback_ringloop.READS_ENV, raising=False)
    monkeypatch.setattr(blkback_ringloop, "_measured", {})
    size, image, _ = _image(tmp_path, "probe.img", 9)
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(size)
    with open(image, "rb") as f, open(sparse, "rb") as g:
        choice = blkback_ringloop.choose_reads(module, f.fileno(), size)
        assert choice["how"].startswith("auto") and choice["probe_kib"] == 256, choice
        assert choice["preadv_us"] > 0 and choice["window_copy_us"] > 0, choice
        faster = choice["preadv_us"] >= blkback_ringloop.WINDOWS_SPEEDUP * choice["window_copy_us"]
        assert choice["reads"] == ("windows" if faster else "preadv"), choice
        assert blkback_ringloop.choose_reads(module, f.fileno(), size) is choice  # measured once
        monkeypatch.setattr(blkback_ringloop, "_measured", {})
        assert blkback_ringloop.choose_reads(module, g.fileno(), size)["reads"] == "preadv"
        assert blkback_ringloop._measured == {}  # noqa: SLF001 - nothing measured, nothing kept
        monkeypatch.setenv(blkback_ringloop.READS_ENV, "windows")
        assert blkback_ringloop.choose_reads(module, f.fileno(), size) == {"reads": "windows", "how": "set"}
        blkback_ringloop.set_reads("preadv")  # blkback serve --reads: before the environment
        assert blkback_ringloop.choose_reads(module, f.fileno(), size) == {"reads": "preadv", "how": "set"}
        monkeypatch.setattr(blkback_ringloop, "READS", None)
        monkeypatch.setenv(blkback_ringloop.READS_ENV, "mmap")
        with pytest.raises(ValueError, match="XENTOOLS_BLKBACK_READS='mmap' is not one of auto, windows, preadv"):
            blkback_ringloop.choose_reads(module, f.fileno(), size)
    with pytest.raises(ValueError, match="not one of"):
        blkback_ringloop.set_reads("fast")
    env = dict(os.environ, XENTOOLS_BLKBACK_READS="mmap")
    result = subprocess.run([sys.executable, "-m", "xentools", "blkback", "serve", "--backend-path", "/x"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "Invalid value for '--reads'" in result.stderr and "'mmap' is not one of" in result.stderr, result.stderr


def test_a_module_built_from_other_sources_is_refused_in_one_line(monkeypatch, capsys) -> None:
    """The module keeps the hash of the C sources it was built from (bindings/build_ringloop.py):
    where the sources beside it differ (edited since `make ringloop`), or it keeps none (built
    before), compiled() says so once on stderr, with the fix, and the pure-Python path serves."""
    module = compiled()
    assert module is not None, "the compiled ring loop is not built: run `make venv`"
    assert module.ffi.string(module.lib.xt_source_hash()).decode() == blkback_ringloop.source_hash()
    monkeypatch.setattr(blkback_ringloop, "source_hash", lambda directory=None: "00000000-0")
    monkeypatch.setattr(blkback_ringloop, "_tried", False)  # as in a new process
    monkeypatch.setattr(blkback_ringloop, "_loaded", None)
    assert compiled() is None and compiled() is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err  # said once, however often asked
    assert "is older than its C sources" in err[0] and "run `make ringloop`; using the pure-Python path" in err[0]

    class Older:  # a module built before the hash was kept
        __file__ = module.__file__
        ffi = module.ffi
        lib = object()

    assert "is older than its C sources" in (blkback_ringloop._stale(Older) or "")  # noqa: SLF001
    monkeypatch.setattr(blkback_ringloop, "source_hash", lambda directory=None: None)  # no sources beside it
    assert blkback_ringloop._stale(module) is None  # noqa: SLF001
