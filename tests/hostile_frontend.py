"""A blkif frontend for testing backends: clean when asked, hostile when run as a script.

Owns (test-only code): `RawFrontend`, a minimal frontend written directly on the core ring
and blkif codecs (grants its rings, writes its keys, sends any slot bytes, collects
responses), with clean block operations (`read`, `write`, `flush`, `discard`) used by the
blkback tests; and `main()`, the hostile frontend: run in its own process against a backend
over the software Xen, it sends thousands of randomized malformed messages and checks that
the backend answers every bad request with ERROR or EOPNOTSUPP, within bounded time.

    python tests/hostile_frontend.py --sim-dir DIR --backend-path P --frontend-id N
        --seed S [--messages N] [--time-limit SECONDS]

Exit status 0 and one JSON line on stdout (counts per kind of attack) when every check
held; otherwise status 1 and the seed on stderr, to replay the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import struct
import sys
import time
import traceback
from collections.abc import Iterable

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xentools.core import blkif
from xentools.core.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    PAGE_SIZE,
    DiscardRequest,
    IndirectRequest,
    Request,
    Response,
    Segment,
)
from xentools.core.features import BackendFeatures, DiskInfo, FrontendRingInfo, QueueRing
from xentools.core.ring import FrontRing, SharedRing, ring_entries
from xentools.core.xenbus import XenbusState
from xentools.platform.interface import Platform, XenstoreError
from xentools.platform.xenstore import run_transaction

BAD = (BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)


class FrontendTimeout(AssertionError):
    """The backend did not reach a state or answer in time."""


class RawFrontend:
    """A frontend of domain `platform.domid` for the vbd at `frontend_path`/`backend_path`."""

    def __init__(self, platform: Platform, frontend_path: str, backend_path: str, backend_id: int,
                 *, timeout: float = 10.0) -> None:
        self.platform = platform
        self.frontend_path = frontend_path
        self.backend_path = backend_path
        self.backend_id = backend_id
        self.timeout = timeout
        self.xs = platform.open_xenstore(timeout=timeout)
        self.gntshr = platform.open_gntshr()
        self.evtchn = platform.open_evtchn()
        self.xs.watch(f"{backend_path}/state", "backend-state")
        self.rings: list[FrontRing] = []
        self.ring_pages: list = []
        self.ports: list[int] = []
        self.abi = blkif.X86_64
        self.features: BackendFeatures | None = None
        self.disk: DiskInfo | None = None
        self.data_pages: list = []  # pages shared for data, unshared on close
        self.persistent = False  # negotiated feature-persistent
        self._pool: dict[int, list] = {}
        self._next_id = 1

    # -- xenstore ----------------------------------------------------------------------------

    def backend_state(self) -> int:
        try:
            return int(self.xs.read(f"{self.backend_path}/state"))
        except XenstoreError:
            return 0

    def set_state(self, state: int) -> None:
        self.xs.write(f"{self.frontend_path}/state", str(state))

    def wait_backend(self, states: Iterable[int], timeout: float | None = None) -> int:
        wanted = set(int(s) for s in states)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            state = self.backend_state()
            if state in wanted:
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrontendTimeout(f"backend stayed in state {state}, wanted one of {sorted(wanted)}")
            self.xs.read_watch(timeout=min(left, 0.2))

    def backend_keys(self) -> dict[str, bytes]:
        keys = {}
        for name in self.xs.directory(self.backend_path):
            try:
                keys[name] = self.xs.read(f"{self.backend_path}/{name}")
            except XenstoreError:
                pass
        return keys

    # -- connecting --------------------------------------------------------------------------

    def connect(self, *, order: int = 0, queues: int = 1, protocol: str | None = None,
                persistent: bool = False, large_sectors: bool = False,
                edit_keys=None, expect_connected: bool = True) -> None:  # type: ignore[no-untyped-def]
        """Grant rings and write the keys (optionally edited by edit_keys(dict) -> dict),
        state Initialised; then wait for the backend to be Connected (or, with
        expect_connected False, for it to give up: Closing or Closed)."""
        self.wait_backend({XenbusState.InitWait})
        self.features = BackendFeatures.from_keys(self.backend_keys())
        self.abi = blkif.abi_for_protocol(protocol) if protocol in blkif.ABIS else blkif.X86_64
        nr_ents = ring_entries(order, self.abi.entry_size)
        rings = []
        for _ in range(queues):
            pages = self.gntshr.share(self.backend_id, 1 << order, True)
            self.ring_pages.append(pages)
            shared = SharedRing(pages.buf, self.abi.entry_size, nr_ents)
            self.rings.append(FrontRing.create(shared, self.platform.full_barrier))
            port = self.evtchn.bind_unbound(self.backend_id)
            self.ports.append(port)
            rings.append(QueueRing(pages.refs, port))
        info = FrontendRingInfo(
            queues=tuple(rings), ring_page_order=order or None, protocol=protocol,
            feature_persistent=persistent, feature_large_sector_size=large_sectors,
        )
        keys = info.to_keys()
        if edit_keys is not None:
            keys = edit_keys(keys)
        keys["state"] = str(int(XenbusState.Initialised))
        def work(tx: int) -> None:
            for key, value in keys.items():
                self.xs.write(f"{self.frontend_path}/{key}", value, tx)

        run_transaction(self.xs, work, what=f"writing {self.frontend_path}")
        if expect_connected:
            state = self.wait_backend({XenbusState.Connected, XenbusState.Closing, XenbusState.Closed})
            if state != XenbusState.Connected:
                raise AssertionError(f"backend refused the connection (state {state})")
            self.disk = DiskInfo.from_keys(self.backend_keys())
            self.features = BackendFeatures.from_keys(self.backend_keys())
            self.persistent = persistent and self.features.feature_persistent
            self.set_state(XenbusState.Connected)
        else:
            self.wait_backend({XenbusState.Closing, XenbusState.Closed})

    def disconnect(self) -> None:
        """Closed, wait for the backend to be Closed (it has unmapped everything), then
        revoke the rings and data pages and drop the frontend's keys."""
        if self.backend_state() not in (XenbusState.Closed, 0):
            self.set_state(XenbusState.Closing)
            self.wait_backend({XenbusState.Closing, XenbusState.Closed})
            self.set_state(XenbusState.Closed)
            self.wait_backend({XenbusState.Closed})
        else:
            self.set_state(XenbusState.Closed)
        for port in self.ports:
            self.evtchn.unbind(port)
        for pages in self.ring_pages + self.data_pages:
            self.gntshr.unshare(pages)
        self.rings, self.ring_pages, self.ports, self.data_pages = [], [], [], []
        self._pool, self.persistent = {}, False
        for name in self.xs.directory(self.frontend_path):
            if name not in ("state", "backend", "backend-id", "virtual-device", "device-type"):
                self.xs.rm(f"{self.frontend_path}/{name}")

    def reconnect_ready(self) -> None:
        """After disconnect(): Initialising, and wait for the backend's InitWait."""
        self.set_state(XenbusState.Initialising)
        self.wait_backend({XenbusState.InitWait})

    def close(self) -> None:
        for closer in (self.evtchn.close, self.gntshr.close, self.xs.close):
            try:
                closer()
            except Exception:
                pass

    # -- the ring ----------------------------------------------------------------------------

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def submit(self, slots: list[bytes], queue: int = 0) -> None:
        ring = self.rings[queue]
        for slot in slots:
            ring.put_request(slot)
        if ring.push_requests_and_check_notify():
            self.evtchn.notify(self.ports[queue])

    def collect(self, count: int, queue: int = 0, timeout: float | None = None) -> list[Response]:
        ring = self.rings[queue]
        out: list[Response] = []
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while len(out) < count:
            available = ring.unconsumed_responses()
            for _ in range(available):
                out.append(self.decode_response(ring.get_response()))
            if len(out) >= count:
                break
            if available or ring.final_check_for_responses():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrontendTimeout(f"{len(out)} of {count} responses after waiting")
            ready, _, _ = select.select([self.evtchn.fileno()], [], [], min(left, 0.05))
            if ready:
                while (port := self.evtchn.pending()) is not None:
                    self.evtchn.unmask(port)
        return out

    def decode_response(self, slot: bytes) -> Response:
        """Any response the backend wrote (it may echo an operation blkif.decode_response
        refuses, e.g. for an unknown request operation)."""
        abi = self.abi
        (rsp_id,) = struct.unpack_from("<Q", slot, abi.rsp_id)
        (status,) = struct.unpack_from("<h", slot, abi.rsp_status)
        return Response(rsp_id, slot[abi.rsp_operation], status)

    def roundtrip(self, slot: bytes, queue: int = 0) -> Response:
        self.submit([slot], queue)
        (rsp,) = self.collect(1, queue)
        return rsp

    # -- clean block operations (unit = the negotiated sector size) -----------------------------

    def share(self, count: int, writable: bool = True):  # type: ignore[no-untyped-def]
        pages = self.gntshr.share(self.backend_id, count, writable)
        self.data_pages.append(pages)
        return pages

    def unshare(self, pages) -> None:  # type: ignore[no-untyped-def]
        self.data_pages.remove(pages)
        self.gntshr.unshare(pages)

    def take(self, count: int):  # type: ignore[no-untyped-def]
        """Pages for one request: reused ones with persistent grants (the backend keeps
        them mapped, so they must not be revoked while connected), else fresh ones."""
        free = self._pool.get(count)
        if self.persistent and free:
            return free.pop()
        return self.share(count)

    def give(self, pages) -> None:  # type: ignore[no-untyped-def]
        if self.persistent:
            self._pool.setdefault(len(pages.refs), []).append(pages)
        else:
            self.unshare(pages)

    def _segments(self, refs, nbytes: int, unit: int) -> tuple[Segment, ...]:  # type: ignore[no-untyped-def]
        per_page = PAGE_SIZE // unit
        segs = []
        left = nbytes // unit
        for ref in refs:
            n = min(left, per_page)
            segs.append(Segment(ref, 0, n - 1))
            left -= n
        return tuple(segs)

    def data_request(self, op: int, sector: int, refs, nbytes: int, unit: int = 512,
                     *, indirect_pages=None) -> tuple[bytes, object]:  # type: ignore[no-untyped-def]
        """The slot of a READ/WRITE of nbytes at `sector` through the pages `refs`, direct
        when 11 segments or fewer, else indirect; returns (slot, indirect pages taken here
        or None)."""
        segs = self._segments(refs, nbytes, unit)
        req_id = self.new_id()
        if len(segs) <= blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST and indirect_pages is None:
            return blkif.encode_request(Request(op, 0, req_id, sector, segs), self.abi), None
        encoded = blkif.encode_indirect_pages(segs)
        taken = None
        if indirect_pages is None:
            indirect_pages = taken = self.take(len(encoded))
        for i, page in enumerate(encoded):
            indirect_pages.buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page
        grefs = tuple(indirect_pages.refs[: len(encoded)])
        slot = blkif.encode_request(IndirectRequest(op, 0, req_id, sector, len(segs), grefs), self.abi)
        return slot, taken

    def write(self, sector: int, data: bytes, queue: int = 0, unit: int = 512, pages=None) -> Response:  # type: ignore[no-untyped-def]
        count = -(-len(data) // PAGE_SIZE)
        own = pages is None
        pages = pages if pages is not None else self.take(count)
        pages.buf[: len(data)] = data
        slot, ipages = self.data_request(BLKIF_OP_WRITE, sector, pages.refs[:count], len(data), unit)
        rsp = self.roundtrip(slot, queue)
        if ipages is not None:
            self.give(ipages)
        if own:
            self.give(pages)
        return rsp

    def read(self, sector: int, nbytes: int, queue: int = 0, unit: int = 512, pages=None) -> tuple[Response, bytes]:  # type: ignore[no-untyped-def]
        count = -(-nbytes // PAGE_SIZE)
        own = pages is None
        pages = pages if pages is not None else self.take(count)
        slot, ipages = self.data_request(BLKIF_OP_READ, sector, pages.refs[:count], nbytes, unit)
        rsp = self.roundtrip(slot, queue)
        data = bytes(pages.buf[:nbytes])
        if ipages is not None:
            self.give(ipages)
        if own:
            self.give(pages)
        return rsp, data

    def flush(self, queue: int = 0, op: int = BLKIF_OP_FLUSH_DISKCACHE) -> Response:
        return self.roundtrip(blkif.encode_request(Request(op, 0, self.new_id(), 0, ()), self.abi), queue)

    def discard(self, sector: int, nr_sectors: int, queue: int = 0, secure: bool = False) -> Response:
        req = DiscardRequest(0, self.new_id(), sector, nr_sectors, secure)
        return self.roundtrip(blkif.encode_request(req, self.abi), queue)


class BackendProcess:
    """`python -m xentools blkback serve` in its own process; stdout and stderr go to files
    (a pipe nobody reads could block the backend)."""

    def __init__(self, root: str, backend_path: str, image: str, *args: str, report: str | None = None) -> None:
        import subprocess

        self.report = report or os.path.join(root, "report.json")
        self.out_path = os.path.join(root, f"blkback-{os.getpid()}-{id(self)}.out")
        self.err_path = self.out_path[:-4] + ".err"
        self._out = open(self.out_path, "w")
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xentools", "blkback", "serve", "--sim-dir", root,
             "--backend-path", backend_path, "--image", image, "--report", self.report, *args],
            stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int | None = None, timeout: float = 10.0) -> int:
        """Send SIGTERM (or `sig`) and wait; returns the exit status."""
        import signal as _signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig if sig is not None else _signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()
            self._err.close()

    def stdout(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def read_report(self) -> dict:
        with open(self.report) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------
# The hostile frontend
# ---------------------------------------------------------------------------------------------


class Hostile:
    """Randomized malformed traffic against one connected backend."""

    def __init__(self, fe: RawFrontend, rng: random.Random) -> None:
        self.fe = fe
        self.rng = rng
        self.counts: dict[str, int] = {}
        self.sent = 0

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.sent += n

    @property
    def sectors(self) -> int:
        assert self.fe.disk is not None
        return self.fe.disk.sectors

    def ungranted_ref(self) -> int:
        return self.rng.choice([0, 1, 7, 31999, 32767, 65535, 2**32 - 1, self.rng.randrange(9000, 30000)])

    def slot(self, fields: dict) -> bytes:
        """A raw 112/108-byte slot: random garbage with chosen fields written in."""
        abi = self.fe.abi
        buf = bytearray(self.rng.randbytes(abi.request_size))
        for offset, (fmt, value) in fields.items():
            struct.pack_into(fmt, buf, offset, value)
        return bytes(buf)

    def bad_request(self, page_ref: int, ipage) -> tuple[bytes, str]:  # type: ignore[no-untyped-def]
        """One malformed request and its kind. Every one must be answered ERROR or
        EOPNOTSUPP; none may touch the image."""
        rng, abi = self.rng, self.fe.abi
        rid = self.fe.new_id()
        kind = rng.choice([
            "bad_op", "reserved_op", "nr_segments", "last_sect", "first_sect", "beyond_disk",
            "ungranted", "indirect_op", "indirect_count", "indirect_garbage",
            "indirect_ungranted", "indirect_beyond", "discard_beyond", "discard_flag",
            "discard_secure", "zero_segments", "indirect_pages",
        ])
        sectors = self.sectors
        good = Segment(page_ref, 0, 7)
        if kind == "bad_op":
            op = rng.choice([7, 8, 9, 100, 200, 255])
            return self.slot({abi.req_operation: ("<B", op), abi.req_id: ("<Q", rid)}), kind
        if kind == "reserved_op":
            return self.slot({abi.req_operation: ("<B", blkif.BLKIF_OP_RESERVED_1), abi.req_id: ("<Q", rid)}), kind
        if kind in ("nr_segments", "zero_segments"):
            n = 0 if kind == "zero_segments" else rng.randrange(12, 256)
            return self.slot({
                abi.req_operation: ("<B", rng.choice([BLKIF_OP_READ, BLKIF_OP_WRITE])),
                abi.req_nr_segments: ("<B", n), abi.req_id: ("<Q", rid),
                abi.req_sector_number: ("<Q", 0),
            }), kind
        if kind in ("last_sect", "first_sect", "beyond_disk", "ungranted"):
            n = rng.randrange(1, 12)
            segs = [(page_ref, 0, 7)] * n
            sector = rng.randrange(0, max(1, sectors - 8 * n))
            i = rng.randrange(n)
            if kind == "last_sect":
                segs[i] = (page_ref, 0, rng.randrange(8, 256))
            elif kind == "first_sect":
                last = rng.randrange(0, 7)
                segs[i] = (page_ref, rng.randrange(last + 1, 256), last)
            elif kind == "ungranted":
                segs[i] = (self.ungranted_ref(), 0, 7)
            else:
                sector = rng.choice([sectors - rng.randrange(0, 8 * n), sectors, sectors + 1, 2**63, 2**64 - 1])
            fields = {
                abi.req_operation: ("<B", rng.choice([BLKIF_OP_READ, BLKIF_OP_WRITE])),
                abi.req_nr_segments: ("<B", n), abi.req_id: ("<Q", rid),
                abi.req_sector_number: ("<Q", sector),
            }
            for j, (gref, first, last) in enumerate(segs):
                fields[abi.req_seg + 8 * j] = ("<IBB", (gref, first, last))
            return self._pack_segs(fields), kind
        if kind.startswith("discard"):
            flag, sector, count = 0, 0, 1
            if kind == "discard_beyond":
                sector = rng.choice([sectors, sectors - 1, 2**63, rng.randrange(0, sectors)])
                count = rng.choice([2, sectors + 1, 2**63, 2**64 - sector - 1 if sector < 2**64 else 1])
                if sector + count <= sectors:
                    count = sectors - sector + 1
            elif kind == "discard_flag":
                flag = rng.randrange(2, 256)
            else:
                flag = blkif.BLKIF_DISCARD_SECURE
                sector = rng.randrange(0, sectors)
            return self.slot({
                abi.discard_operation: ("<B", BLKIF_OP_DISCARD), abi.discard_flag: ("<B", flag),
                abi.discard_id: ("<Q", rid), abi.discard_sector_number: ("<Q", sector),
                abi.discard_nr_sectors: ("<Q", min(count, 2**64 - 1)),
            }), kind
        # indirect attacks
        inner = rng.choice([BLKIF_OP_READ, BLKIF_OP_WRITE])
        nseg = rng.randrange(1, 33)
        sector = rng.randrange(0, max(1, sectors - 8 * nseg))
        grefs = [ipage.refs[0]] + [0] * 7
        page = bytearray(PAGE_SIZE)
        for j in range(nseg):
            struct.pack_into("<IBB", page, 8 * j, page_ref, 0, 7)
        if kind == "indirect_op":
            inner = rng.choice([2, 3, 4, 5, 6, 7, 99])
        elif kind == "indirect_count":
            nseg = rng.choice([0, 4097, 65535, (self.fe.features.feature_max_indirect_segments or 0) + 1])
        elif kind == "indirect_garbage":
            page = bytearray(rng.randbytes(PAGE_SIZE))
            j = rng.randrange(nseg)
            struct.pack_into("<IBB", page, 8 * j, page_ref, rng.randrange(0, 8), rng.randrange(8, 256))
        elif kind == "indirect_ungranted":
            if rng.random() < 0.5:
                grefs[0] = self.ungranted_ref()
            else:
                struct.pack_into("<IBB", page, 8 * rng.randrange(nseg), self.ungranted_ref(), 0, 7)
        elif kind == "indirect_beyond":
            sector = rng.choice([sectors, sectors - 1, 2**64 - 8])
        elif kind == "indirect_pages":
            # More than one indirect page, the later ones not granted (or past the offer).
            nseg = rng.randrange(513, 4097)
            grefs[1:] = [self.ungranted_ref() for _ in range(7)]
        self.indirect_page = bytes(page)  # written into the indirect page just before sending
        fields = {
            abi.indirect_operation: ("<B", BLKIF_OP_INDIRECT), abi.indirect_indirect_op: ("<B", inner),
            abi.indirect_nr_segments: ("<H", nseg & 0xFFFF), abi.indirect_id: ("<Q", rid),
            abi.indirect_sector_number: ("<Q", sector), abi.indirect_handle: ("<H", 0),
        }
        for j, gref in enumerate(grefs):
            fields[abi.indirect_grefs + 4 * j] = ("<I", gref)
        return self.slot(fields), kind

    def _pack_segs(self, fields: dict) -> bytes:
        abi = self.fe.abi
        buf = bytearray(self.rng.randbytes(abi.request_size))
        for offset, (fmt, value) in fields.items():
            if isinstance(value, tuple):
                struct.pack_into(fmt, buf, offset, *value)
            else:
                struct.pack_into(fmt, buf, offset, value)
        return bytes(buf)


def _attack_session(fe: RawFrontend, hostile: Hostile, budget: int, deadline: float) -> None:
    """Connected: batches of malformed requests mixed with clean reads on random queues,
    slots rewritten after they were published (double-fetch bait), event storms, and a check
    of every answer."""
    rng = hostile.rng
    data = fe.share(1, writable=True)  # a granted page for the segments that are valid
    ipage = fe.share(1, writable=True)
    ro_page = fe.share(1, writable=False)  # a READ into it must fail: it is granted read-only
    sent = 0
    while sent < budget and time.monotonic() < deadline:
        queue = rng.randrange(len(fe.rings))
        ring = fe.rings[queue]
        batch = rng.randrange(1, min(ring.size, 24) + 1)
        slots, kinds = [], []
        pages: dict[int, bytes] = {}
        for _ in range(batch):
            roll = rng.random()
            rid = fe.new_id()
            if roll < 0.1:
                # A clean read of the first sectors (reads never change the image).
                slots.append(blkif.encode_request(Request(BLKIF_OP_READ, 0, rid, 0, (Segment(data.refs[0], 0, 7),)), fe.abi))
                kinds.append("clean_read")
            elif roll < 0.15:
                slots.append(blkif.encode_request(Request(BLKIF_OP_READ, 0, rid, 0, (Segment(ro_page.refs[0], 0, 7),)), fe.abi))
                kinds.append("read_into_readonly_grant")
            else:
                slot, kind = hostile.bad_request(data.refs[0], ipage)
                slots.append(slot)
                kinds.append(kind)
                if kind.startswith("indirect"):
                    pages[len(slots) - 1] = hostile.indirect_page
        # The indirect page is shared by every request of the batch: send indirect attacks
        # one at a time so each sees its own page.
        ids = {}
        for index, (slot, kind) in enumerate(zip(slots, kinds)):
            ids[struct.unpack_from("<Q", slot, fe.abi.req_id)[0]] = kind
            if kind.startswith("indirect"):
                ipage.buf[:PAGE_SIZE] = pages[index]
                rsp = fe.roundtrip(slot, queue)
                _check(rsp, kind)
                hostile.count(kind)
        rest = [(s, k) for s, k in zip(slots, kinds) if not k.startswith("indirect")]
        if not rest:
            sent += batch
            continue
        fe.submit([s for s, _ in rest], queue)
        if rng.random() < 0.2:
            # Rewrite published slots (double-fetch bait): the sector becomes 2**64 - 1, so
            # whichever version the backend copies is an error. Only bytes past the response
            # struct are touched: a slot the backend already answered keeps its response.
            first = (ring.req_prod_pvt - len(rest)) & 0xFFFFFFFF
            abi = fe.abi
            assert abi.req_sector_number == abi.discard_sector_number >= abi.response_size
            for i, (_, kind) in enumerate(rest):
                if kind != "clean_read":
                    at = ring.shared.slot_offset(first + i) + abi.req_sector_number
                    ring.shared.buf[at : at + 8] = b"\xff" * 8
            hostile.count("rewritten_after_publish")
        if rng.random() < 0.2:
            for _ in range(rng.randrange(1, 50)):  # event storm: notify with no work
                fe.evtchn.notify(fe.ports[queue])
            hostile.count("event_storm")
        for rsp in fe.collect(len(rest), queue):
            kind = ids.get(rsp.id)
            if kind is None:
                raise AssertionError(f"response for unknown id {rsp.id}")
            _check(rsp, kind)
            hostile.count(kind)
        sent += batch
    # The pages stay shared until disconnect(): with persistent grants the backend keeps
    # them mapped while connected.


def _check(rsp: Response, kind: str) -> None:
    if kind == "clean_read":
        if rsp.status != BLKIF_RSP_OKAY or rsp.operation != BLKIF_OP_READ:
            raise AssertionError(f"clean read answered {rsp}")
    elif rsp.status not in BAD:
        raise AssertionError(f"malformed request ({kind}) answered with status {rsp.status}: {rsp}")


def _fatal_session(fe: RawFrontend, hostile: Hostile) -> None:
    """Ring index games that must close the ring: the producer claims more than the ring."""
    queue = hostile.rng.randrange(len(fe.rings))
    ring = fe.rings[queue]
    shared = ring.shared
    kind = hostile.rng.choice(["overflow", "overflow_far", "backwards"])
    if kind == "overflow":
        shared.req_prod = ring.req_prod_pvt + ring.size + 1
    elif kind == "overflow_far":
        shared.req_prod = ring.req_prod_pvt + hostile.rng.randrange(ring.size + 1, 2**31)
    else:
        shared.req_prod = (ring.req_prod_pvt - hostile.rng.randrange(1, 2**31)) & 0xFFFFFFFF
    fe.evtchn.notify(fe.ports[queue])
    fe.wait_backend({XenbusState.Closing, XenbusState.Closed})
    hostile.count(f"ring_{kind}")


def _bogus_handshake(fe: RawFrontend, hostile: Hostile) -> None:
    """Keys the backend must refuse: it must go to Closing and stay alive."""
    rng = hostile.rng
    kind = rng.choice(["missing_ring_ref", "order_too_big", "too_many_queues", "bad_protocol",
                       "missing_event_channel", "ungranted_ring", "bad_number", "bad_state",
                       "order_mismatch", "ungranted_queue_ring", "unbindable_channel"])
    order = 0
    queues = 1

    def edit(keys: dict) -> dict:
        if kind == "missing_ring_ref":
            keys = {k: v for k, v in keys.items() if "ring-ref" not in k}
        elif kind == "order_too_big":
            keys["ring-page-order"] = rng.choice(["5", "9", "31", "4294967295", "99999999999"])
        elif kind == "too_many_queues":
            keys["multi-queue-num-queues"] = rng.choice(["5", "64", "256", "100000", "0"])
        elif kind == "bad_protocol":
            keys["protocol"] = rng.choice(["arm-abi", "x86_16-abi", "", "x86_64-abi\n", "\xff"])
        elif kind == "missing_event_channel":
            keys = {k: v for k, v in keys.items() if "event-channel" not in k}
        elif kind == "ungranted_ring":
            keys["ring-ref"] = str(rng.randrange(20000, 32000))
        elif kind == "bad_number":
            keys["event-channel"] = rng.choice(["-1", "0x10", " 5", "5 ", "", "1e3"])
        elif kind == "order_mismatch":
            keys["ring-page-order"] = str(rng.randrange(1, 5))  # but only "ring-ref" is written
        elif kind == "ungranted_queue_ring":
            keys["queue-1/ring-ref"] = str(rng.randrange(20000, 32000))
        elif kind == "unbindable_channel":
            keys["event-channel"] = str(rng.choice([0, 4095, 4096, 2**32 - 1]))
        return keys

    if kind == "ungranted_queue_ring":
        queues = 2
    if kind == "bad_state":
        fe.set_state(rng.choice(["2", "7", "9", "banana", "-1", ""]))
        fe.wait_backend({XenbusState.Closing, XenbusState.Closed})
    else:
        fe.connect(order=order, queues=queues, edit_keys=edit, expect_connected=False)
    hostile.count(f"handshake_{kind}")


def fe_max_queues(fe: RawFrontend) -> int:
    return BackendFeatures.from_keys(fe.backend_keys()).multi_queue_max_queues


def run_hostile(fe: RawFrontend, rng: random.Random, messages: int, time_limit: float) -> dict[str, int]:
    hostile = Hostile(fe, rng)
    deadline = time.monotonic() + time_limit
    cycle = 0
    while hostile.sent < messages and time.monotonic() < deadline:
        cycle += 1
        choice = rng.random()
        if choice < 0.3:
            _bogus_handshake(fe, hostile)
        else:
            order = rng.randrange(0, 3)
            protocol = rng.choice([None, "x86_64-abi", "x86_32-abi"])
            queues = rng.randrange(1, (fe_max_queues(fe) or 1) + 1)
            fe.connect(order=order, queues=queues, protocol=protocol, persistent=rng.random() < 0.5)
            _attack_session(fe, hostile, rng.randrange(50, 250), deadline)
            if rng.random() < 0.5:
                _fatal_session(fe, hostile)
        fe.disconnect()
        fe.reconnect_ready()
    hostile.counts["cycles"] = cycle
    return hostile.counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hostile blkif frontend (test only)")
    parser.add_argument("--sim-dir", required=True)
    parser.add_argument("--backend-path", required=True)
    parser.add_argument("--frontend-path", required=True)
    parser.add_argument("--frontend-id", type=int, required=True)
    parser.add_argument("--backend-id", type=int, default=0)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--time-limit", type=float, default=40.0)
    args = parser.parse_args(argv)
    from xentools.platform.sim.platform import SoftwarePlatform

    platform = SoftwarePlatform(args.sim_dir, args.frontend_id)
    fe = RawFrontend(platform, args.frontend_path, args.backend_path, args.backend_id, timeout=10.0)
    try:
        counts = run_hostile(fe, random.Random(args.seed), args.messages, args.time_limit)
    except Exception:
        traceback.print_exc()
        print(f"hostile_frontend: FAILED with seed {args.seed}", file=sys.stderr)
        return 1
    finally:
        fe.close()
    print(json.dumps({"seed": args.seed, "counts": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
