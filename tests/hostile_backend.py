"""A test-only blkif backend over the software Xen: honest, or hostile on purpose.

Owns: `BackendSession` (one vbd served from an in-memory image, the whole xenbus handshake,
every ring and queue, direct and indirect requests, persistent grants, flush, barrier and
discard), the hostile behaviours used by tests/test_blkfront_hostile.py (malformed responses,
event storms, bad xenstore values, a backend that never reaches InitWait) and
tests/test_blkfront_stale.py (READs answered OKAY without a byte written; a backend that
looks at what the frontend's granted pages hold besides the request's data), `known_data()`
(the image content the tests verify reads against), `make_vbd()`/`remove_vbd()` (the
toolstack step, through xentools.devices.toolstack when it exists, else a stand-in), and a
line-oriented JSON control protocol on stdin/stdout so that the backend runs in its own
process: `python tests/hostile_backend.py --sim-dir DIR [--domid 0]`.
Must not: be imported by xentools; it is a peer for tests, deliberately simpler than blkback
(single-threaded, memory-backed) and never trusted as a reference for what blkback must do.

Control protocol (one JSON object per line):
  -> {"cmd": "serve", "backend": PATH, "offer": {...}, "image": {...}, "hostile": {...}|null}
  <- {"event": "done", "malformed": N, "fatal_sent": bool, "kinds": {...}, "error": str|null}
  -> {"cmd": "quit"}
A session ends when the frontend reaches Closed (or after `session_timeout` seconds).
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
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from xentools.core.blkif import (  # noqa: E402
    ABIS,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    DiscardRequest,
    IndirectRequest,
    Request,
    Response,
    abi_for_protocol,
    decode_indirect_segments,
    decode_request,
    decode_request_header,
    encode_response,
)
from xentools.core.errors import BlkifError, FeatureError, RingError  # noqa: E402
from xentools.core.features import BackendFeatures, FrontendRingInfo  # noqa: E402
from xentools.core.ring import BackRing, SharedRing, ring_entries  # noqa: E402
from xentools.core.xenbus import XenbusState, parse_state  # noqa: E402
from xentools.platform.interface import PAGE_SIZE, PlatformError, XenstoreError  # noqa: E402
from xentools.platform.xenstore import run_transaction  # noqa: E402

_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Known content and the toolstack step
# ---------------------------------------------------------------------------------------------


def known_data(seed: int, offset: int, length: int) -> bytes:
    """The image's bytes [offset, offset+length): every 16-byte cell holds (cell index, seed),
    so any misplaced or stale byte shows."""
    first = offset // 16
    last = (offset + length + 15) // 16
    cells = struct.pack(f"<{2 * (last - first)}Q", *[v for i in range(first, last) for v in (i, seed)])
    start = offset - first * 16
    return cells[start : start + length]


def make_vbd(xs, *, backend_domid: int, frontend_domid: int, devid: int, params: str = "",
             mode: str = "w", extra_backend: dict | None = None) -> tuple[str, str]:
    """Create the toolstack keys of both directories; returns (backend path, frontend path).

    Uses xentools.devices.toolstack.create_vbd when the blkback helper has written it,
    else writes the same keys here in one transaction (blkif.h's toolstack keys).
    """
    try:
        from xentools.devices.toolstack import create_vbd
    except ImportError:
        create_vbd = None
    if create_vbd is not None:
        paths = create_vbd(
            xs, backend_domid=backend_domid, frontend_domid=frontend_domid, devid=devid,
            params=params, mode=mode, extra_backend=extra_backend,
        )
        return paths.backend, paths.frontend
    backend = f"/local/domain/{backend_domid}/backend/vbd/{frontend_domid}/{devid}"
    frontend = f"/local/domain/{frontend_domid}/device/vbd/{devid}"
    def work(tx: int) -> None:
        for key, value in {
            "frontend": frontend, "frontend-id": str(frontend_domid), "params": params or "mem",
            "type": "file", "mode": mode, "online": "1", "state": "1", **(extra_backend or {}),
        }.items():
            xs.write(f"{backend}/{key}", value, tx)
        for key, value in {
            "backend": backend, "backend-id": str(backend_domid), "virtual-device": str(devid),
            "device-type": "disk", "state": "1",
        }.items():
            xs.write(f"{frontend}/{key}", value, tx)
        xs.set_perms(backend, [f"n{backend_domid}", f"r{frontend_domid}"], tx)
        xs.set_perms(frontend, [f"n{frontend_domid}", f"r{backend_domid}"], tx)

    run_transaction(xs, work, what="make_vbd")
    return backend, frontend


def remove_vbd(xs, backend: str, frontend: str) -> None:
    for path in (frontend, backend):
        try:
            xs.rm(path)
        except XenstoreError:
            pass


# ---------------------------------------------------------------------------------------------
# What the backend offers, and how it misbehaves
# ---------------------------------------------------------------------------------------------


@dataclass
class Offer:
    max_ring_page_order: int = 4
    max_queues: int = 4
    max_indirect_segments: int = 256
    persistent: bool = True
    flush: bool = True
    barrier: bool = False
    discard: bool = True
    indirect_rsp_op: bool = False  # answer INDIRECT with INDIRECT instead of the inner op
    bad_keys: dict = field(default_factory=dict)  # key -> raw value published (hostile)
    stall_in: str | None = None  # "Initialising": never InitWait; "InitWait": never Connected
    leak_mapping: bool = False  # keep the pages of one non-persistent request mapped (XSA-396)
    readonly: bool = False  # VDISK_READONLY in info; writes answered ERROR
    refuse_ops: list = field(default_factory=list)  # operations answered EOPNOTSUPP anyway
    unwritten_reads: bool = False  # answer every READ OKAY without writing its pages (lying)
    peek: bool = False  # count bytes of older data in the pages a request grants (XSA-403)


@dataclass
class Hostile:
    """The plan of a hostile session: `honest` requests answered correctly first, then the
    non-fatal mischief in `nonfatal`, then `fatal` (one malformed response replacing an
    answer) plus `extra` more malformed responses in the same push."""

    seed: int
    honest: int = 0
    nonfatal: list = field(default_factory=list)  # "storm", "error_garbage", "eopnotsupp"
    fatal: str | None = None
    extra: int = 0


FATAL_KINDS = (
    "bad_id", "duplicate", "wrong_op", "prod_jump", "prod_back", "garbage_status",
    "never_sent", "garbage_data_bad_op", "silent",
)


# ---------------------------------------------------------------------------------------------
# One served device
# ---------------------------------------------------------------------------------------------


class _Queue:
    def __init__(self, index: int, pages, ring: BackRing, port: int) -> None:
        self.index = index
        self.pages = pages
        self.ring = ring
        self.port = port
        self.sent: list[bytes] = []  # responses sent, for "duplicate"


class BackendSession:
    """Serve the vbd whose backend directory is `backend` until the frontend is Closed."""

    def __init__(self, platform, backend: str, offer: Offer, *, sectors: int, sector_size: int,
                 seed: int, hostile: Hostile | None = None, session_timeout: float = 30.0) -> None:
        self.platform = platform
        self.backend = backend
        self.offer = offer
        self.sectors = sectors
        self.ss = sector_size
        self.seed = seed
        self.hostile = hostile
        self.rng = random.Random(hostile.seed if hostile else seed)
        self.image = bytearray(known_data(seed, 0, sectors * sector_size))
        self.session_timeout = session_timeout
        self.xs = platform.open_xenstore()
        self.gnttab = platform.open_gnttab()
        self.evtchn = platform.open_evtchn()
        self.queues: list[_Queue] = []
        self.cache: dict[int, object] = {}  # persistent grants: ref -> MappedPages
        self.leaked: list[object] = []  # mappings kept on purpose (Offer.leak_mapping)
        self.persistent = False
        self.abi = ABIS["x86_64-abi"]
        self.malformed = 0
        self.kinds: dict[str, int] = {}
        self.fatal_sent = False
        self.answered = 0
        self.error: str | None = None
        self.state = XenbusState.Initialising

    # -- helpers ------------------------------------------------------------------------------

    def _count(self, kind: str, n: int = 1) -> None:
        self.malformed += n
        self.kinds[kind] = self.kinds.get(kind, 0) + n

    def _write_state(self, state: XenbusState) -> None:
        self.state = state
        self.xs.write(f"{self.backend}/state", str(int(state)))

    def _read_dir(self, path: str, depth: int = 2) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for name in self.xs.directory(path):
            child = f"{path}/{name}"
            try:
                value = self.xs.read(child)
            except XenstoreError:
                continue
            if value:
                out[name] = value
            if depth > 1 and name.startswith("queue-"):
                for sub, subvalue in self._read_dir(child, depth - 1).items():
                    out[f"{name}/{sub}"] = subvalue
        return out

    # -- the handshake ------------------------------------------------------------------------

    def publish_features(self) -> None:
        offer = self.offer
        features = BackendFeatures(
            feature_flush_cache=offer.flush,
            feature_barrier=offer.barrier,
            feature_discard=offer.discard,
            feature_persistent=offer.persistent,
            feature_max_indirect_segments=offer.max_indirect_segments,
            max_ring_page_order=offer.max_ring_page_order,
            multi_queue_max_queues=offer.max_queues,
        )
        keys = features.to_keys()
        for key, value in offer.bad_keys.items():
            if key not in ("sectors", "sector-size", "info", "state"):
                keys[key] = value
                self._count("bad_xenstore")
        for key, value in keys.items():
            self.xs.write(f"{self.backend}/{key}", value)

    def connect_rings(self, frontend: str, frontend_id: int) -> None:
        keys = self._read_dir(frontend)
        info = FrontendRingInfo.from_keys(keys)
        info.validate(max_ring_page_order=self.offer.max_ring_page_order, max_queues=self.offer.max_queues)
        self.abi = abi_for_protocol(info.protocol)
        self.persistent = info.feature_persistent and self.offer.persistent
        size = ring_entries(info.order, self.abi.entry_size)
        for index, queue in enumerate(info.queues):
            pages = self.gnttab.map(frontend_id, queue.ring_refs, True)
            shared = SharedRing(pages.buf, self.abi.entry_size, size)
            ring = BackRing(shared, self.platform.full_barrier)
            port = self.evtchn.bind_interdomain(frontend_id, queue.event_channel)
            self.queues.append(_Queue(index, pages, ring, port))
        info = "4" if self.offer.readonly else "0"  # VDISK_READONLY
        disk = {"sectors": str(self.sectors), "info": info, "sector-size": str(self.ss)}
        for key in ("sectors", "sector-size", "info"):
            if key in self.offer.bad_keys:
                disk[key] = self.offer.bad_keys[key]
                self._count("bad_xenstore")
        # An odd but valid value is not a lie: serve the disk as published, so a frontend
        # that accepts it still reads the known content (at the published geometry).
        raw = disk["sector-size"]
        if raw.isdigit() and 512 <= int(raw) <= PAGE_SIZE and int(raw) & (int(raw) - 1) == 0:
            self.ss = int(raw)
        raw = disk["sectors"]
        if raw.isdigit() and len(raw) < 20:
            self.sectors = int(raw)
        # DiskInfo's keys, written raw so that hostile values get through.
        for key, value in disk.items():
            self.xs.write(f"{self.backend}/{key}", value)

    def disconnect(self) -> None:
        for queue in self.queues:
            try:
                self.evtchn.unbind(queue.port)
            except PlatformError:
                pass
            try:
                self.gnttab.unmap(queue.pages)
            except PlatformError:
                pass
        self.queues = []
        for mapped in [*self.cache.values(), *self.leaked]:
            try:
                self.gnttab.unmap(mapped)
            except PlatformError:
                pass
        self.cache = {}
        self.leaked = []

    def run(self) -> None:
        xs = self.xs
        frontend = xs.read(f"{self.backend}/frontend").decode()
        frontend_id = int(xs.read(f"{self.backend}/frontend-id"))
        token = "hostile-backend"
        xs.watch(f"{frontend}/state", token)
        deadline = time.monotonic() + self.session_timeout
        if self.offer.stall_in == "Initialising":
            self._write_state(XenbusState.Initialising)
        else:
            self.publish_features()
            if "state" in self.offer.bad_keys:
                self._count("bad_xenstore")
                xs.write(f"{self.backend}/state", self.offer.bad_keys["state"])
            else:
                self._write_state(XenbusState.InitWait)
        evfd = self.evtchn.fileno()
        xsfd = xs.fileno()
        frontend_state = XenbusState.Unknown
        while time.monotonic() < deadline:
            ready, _, _ = select.select([evfd, xsfd], [], [], 0.05)
            if xsfd in ready or not ready:
                while xs.read_watch(0) is not None:
                    pass
                try:
                    frontend_state = parse_state(xs.read(f"{frontend}/state"))
                except (XenstoreError, FeatureError):
                    frontend_state = XenbusState.Unknown
                if frontend_state == XenbusState.Unknown and self.state != XenbusState.Initialising:
                    break  # the frontend directory went away
                if frontend_state in (XenbusState.Initialised, XenbusState.Connected) and not self.queues \
                        and self.state == XenbusState.InitWait and self.offer.stall_in != "InitWait":
                    try:
                        self.connect_rings(frontend, frontend_id)
                    except (FeatureError, PlatformError, RingError, BlkifError, XenstoreError) as err:
                        self.error = f"connect: {err}"
                        self._write_state(XenbusState.Closing)
                        continue
                    self._write_state(XenbusState.Connected)
                elif frontend_state == XenbusState.Closing and self.state not in (XenbusState.Closing, XenbusState.Closed):
                    self._write_state(XenbusState.Closing)
                elif frontend_state == XenbusState.Closed:
                    self.disconnect()
                    self._write_state(XenbusState.Closed)
                    break
            if evfd in ready:
                ports = []
                while True:
                    port = self.evtchn.pending()
                    if port is None:
                        break
                    ports.append(port)
                for queue in self.queues:
                    self.serve(queue)
                for port in ports:
                    try:
                        self.evtchn.unmask(port)
                    except PlatformError:
                        pass
        else:
            self.error = self.error or "session timed out"
        try:
            xs.unwatch(f"{frontend}/state", token)
        except XenstoreError:
            pass
        self.disconnect()

    def close(self) -> None:
        for handle in (self.evtchn, self.gnttab, self.xs):
            try:
                handle.close()
            except PlatformError:
                pass

    # -- requests -----------------------------------------------------------------------------

    def serve(self, queue: _Queue) -> None:
        ring = queue.ring
        while not self.fatal_sent:  # after a fatal message our own ring indices are bogus
            try:
                count = ring.unconsumed_requests()
            except RingError as err:
                self.error = f"ring: {err}"
                return
            for _ in range(count):
                raw = ring.get_request()
                self.handle(queue, raw)
                if self.fatal_sent:
                    return
            if ring.push_responses_and_check_notify():
                self._notify(queue)
            if not ring.final_check_for_requests():
                return

    def _notify(self, queue: _Queue) -> None:
        try:
            self.evtchn.notify(queue.port)
        except PlatformError:
            pass

    def _respond(self, queue: _Queue, req_id: int, op: int, status: int) -> None:
        data = encode_response(Response(req_id, op, status), self.abi)
        queue.ring.put_response(data)
        queue.sent.append(data)

    def handle(self, queue: _Queue, raw: bytes) -> None:
        if self.fatal_sent:
            return  # after a fatal message the frontend must not get answers it could trust
        try:
            req = decode_request(raw, self.abi)
        except BlkifError:
            header = decode_request_header(raw, self.abi)
            self._respond(queue, header.id, header.operation, BLKIF_RSP_ERROR)
            return
        plan = self.hostile
        if plan is not None and self.answered >= plan.honest:
            if plan.nonfatal:
                kind = plan.nonfatal.pop(0)
                if self.mischief(queue, req, kind):
                    self.answered += 1
                    return
            elif plan.fatal is not None:
                self.fatal(queue, req, plan.fatal, plan.extra)
                return
        status = self.execute(req)
        op = req.operation
        if isinstance(req, IndirectRequest):
            op = BLKIF_OP_INDIRECT if self.offer.indirect_rsp_op else req.indirect_op
        self._respond(queue, req.id, op, status)
        self.answered += 1

    # -- honest execution ------------------------------------------------------------------------

    def _map(self, refs: list[int], writable: bool) -> tuple[list[memoryview], object | None]:
        """Views of the frontend's pages `refs`; the second item is unmapped after use."""
        front = int(self.xs.read(f"{self.backend}/frontend-id"))
        if self.persistent:
            views = []
            for ref in refs:
                mapped = self.cache.get(ref)
                if mapped is None:
                    mapped = self.gnttab.map(front, [ref], True)
                    self.cache[ref] = mapped
                views.append(mapped.buf)
            return views, None
        mapped = self.gnttab.map(front, refs, writable)
        buf = mapped.buf
        return [buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(len(refs))], mapped

    def _segments(self, req):
        if isinstance(req, Request):
            return req.segments
        views, mapped = self._map(list(req.indirect_grefs), False)
        try:
            return decode_indirect_segments(views, req.nr_segments)
        finally:
            if mapped is not None:
                self.gnttab.unmap(mapped)

    def execute(self, req) -> int:
        ss = self.ss
        size = min(self.sectors * ss, len(self.image))
        if isinstance(req, DiscardRequest):
            if not self.offer.discard or BLKIF_OP_DISCARD in self.offer.refuse_ops:
                return BLKIF_RSP_EOPNOTSUPP
            start, end = req.sector_number * ss, (req.sector_number + req.nr_sectors) * ss
            if end > size:
                return BLKIF_RSP_ERROR
            self.image[start:end] = bytes(end - start)
            return BLKIF_RSP_OKAY
        op = req.indirect_op if isinstance(req, IndirectRequest) else req.operation
        if op in self.offer.refuse_ops:
            return BLKIF_RSP_EOPNOTSUPP
        if op == BLKIF_OP_FLUSH_DISKCACHE and not self.offer.flush:
            return BLKIF_RSP_EOPNOTSUPP
        if op == BLKIF_OP_WRITE_BARRIER and not self.offer.barrier:
            return BLKIF_RSP_EOPNOTSUPP
        if isinstance(req, IndirectRequest) and req.nr_segments > self.offer.max_indirect_segments:
            return BLKIF_RSP_ERROR
        try:
            segments = self._segments(req)
        except (BlkifError, PlatformError):
            return BLKIF_RSP_ERROR
        if not segments:
            return BLKIF_RSP_OKAY
        if self.offer.readonly and op != BLKIF_OP_READ:
            return BLKIF_RSP_ERROR
        spp = PAGE_SIZE // ss
        pos = req.sector_number * ss
        total = sum((s.last_sect - s.first_sect + 1) * ss for s in segments)
        if any(s.last_sect >= spp for s in segments) or pos + total > size:
            return BLKIF_RSP_ERROR
        try:
            views, mapped = self._map([s.gref for s in segments], op == BLKIF_OP_READ)
        except PlatformError:
            return BLKIF_RSP_ERROR
        try:
            if self.offer.peek:
                self._peek(op, segments, views)
            if op == BLKIF_OP_READ and self.offer.unwritten_reads:
                self._count("unwritten_read")
                return BLKIF_RSP_OKAY  # the lie: "done", and not a byte written
            for seg, page in zip(segments, views):
                first, n = seg.first_sect * ss, (seg.last_sect - seg.first_sect + 1) * ss
                if op == BLKIF_OP_READ:
                    page[first : first + n] = self.image[pos : pos + n]
                elif op in (BLKIF_OP_WRITE, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
                    self.image[pos : pos + n] = page[first : first + n]
                pos += n
        finally:
            if mapped is not None:
                if self.offer.leak_mapping and not self.leaked:
                    self.leaked.append(mapped)  # answered, yet still mapped: XSA-396
                else:
                    self.gnttab.unmap(mapped)
        return BLKIF_RSP_OKAY

    def _peek(self, op: int, segments, views) -> None:
        """What a curious backend sees: a READ's pages before it writes them, and the bytes
        of a WRITE's pages outside its segments, must hold nothing (zeros), never data of
        another request (XSA-403). Counts such bytes as "unrelated_bytes"."""
        ss = self.ss
        for seg, page in zip(segments, views):
            if op == BLKIF_OP_READ:
                outside = [bytes(page)]
            else:
                outside = [bytes(page[: seg.first_sect * ss]), bytes(page[(seg.last_sect + 1) * ss :])]
            found = sum(len(part) - part.count(0) for part in outside)
            if found:  # not a malformed message of ours: what the frontend leaked
                self.kinds["unrelated_bytes"] = self.kinds.get("unrelated_bytes", 0) + found

    # -- hostile behaviour ------------------------------------------------------------------------

    def _garbage_into(self, req) -> None:
        """Random bytes into the data pages of a READ (what a lying backend would write)."""
        if isinstance(req, DiscardRequest):
            return
        op = req.indirect_op if isinstance(req, IndirectRequest) else req.operation
        if op != BLKIF_OP_READ:
            return
        try:
            segments = self._segments(req)
            views, mapped = self._map([s.gref for s in segments], True)
        except (BlkifError, PlatformError):
            return
        try:
            for page in views:
                page[:] = self.rng.randbytes(PAGE_SIZE)
        finally:
            if mapped is not None:
                self.gnttab.unmap(mapped)

    def mischief(self, queue: _Queue, req, kind: str) -> bool:
        """Non-fatal hostility; True if `req` was answered by it."""
        if kind == "storm":
            n = self.rng.randint(5, 40)
            for _ in range(n):
                self._notify(queue)
            self._count("storm_event", n)
            return False
        if kind == "error_garbage":
            self._garbage_into(req)
            self._respond(queue, req.id, self._rsp_op(req), BLKIF_RSP_ERROR)
            self._count("error_garbage")
            return True
        if kind == "eopnotsupp":
            self._garbage_into(req)
            self._respond(queue, req.id, self._rsp_op(req), BLKIF_RSP_EOPNOTSUPP)
            self._count("eopnotsupp_garbage")
            return True
        return False

    def _rsp_op(self, req) -> int:
        return req.indirect_op if isinstance(req, IndirectRequest) else req.operation

    def _raw_response(self, queue: _Queue, req_id: int, op: int, status: int) -> None:
        """Write a response slot without BackRing's bookkeeping (it may be one too many)."""
        buf = bytearray(self.abi.response_size)
        struct.pack_into("<Q", buf, self.abi.rsp_id, req_id & 0xFFFFFFFFFFFFFFFF)
        buf[self.abi.rsp_operation] = op & 0xFF
        struct.pack_into("<h", buf, self.abi.rsp_status, status)
        ring = queue.ring
        ring.shared.write_slot(ring.rsp_prod_pvt, buf)
        ring.rsp_prod_pvt = ring.rsp_prod_pvt + 1

    def fatal(self, queue: _Queue, req, kind: str, extra: int) -> None:
        ring = queue.ring
        size = ring.size
        kinds = [kind] + [self.rng.choice(FATAL_KINDS[:-2]) for _ in range(extra)]
        self.fatal_sent = True
        for index, k in enumerate(kinds):
            self._count(f"fatal_{k}")
            if k == "silent":
                return  # never answer: the frontend's request timeout must fire
            if k == "bad_id":
                self._raw_response(queue, self.rng.getrandbits(64), self._rsp_op(req), BLKIF_RSP_OKAY)
            elif k == "duplicate":
                if queue.sent:
                    dup = self.rng.choice(queue.sent)
                    ring.shared.write_slot(ring.rsp_prod_pvt, dup)
                    ring.rsp_prod_pvt = ring.rsp_prod_pvt + 1
                else:
                    self._raw_response(queue, req.id ^ (size << 8), self._rsp_op(req), BLKIF_RSP_OKAY)
            elif k == "wrong_op":
                wrong = self.rng.choice([op for op in (0, 1, 2, 3, 5, 6, 4, 7, 200) if op != self._rsp_op(req)])
                self._raw_response(queue, req.id, wrong, BLKIF_RSP_OKAY)
            elif k == "garbage_status":
                status = self.rng.choice([1, 2, 3, -3, -100, 32767, -32768])
                self._raw_response(queue, req.id, self._rsp_op(req), status)
            elif k == "never_sent":
                self._raw_response(queue, req.id + size * self.rng.randint(1, 1000), self._rsp_op(req), BLKIF_RSP_OKAY)
            elif k == "garbage_data_bad_op":
                self._garbage_into(req)
                self._raw_response(queue, req.id, (self._rsp_op(req) + 1) % 2, BLKIF_RSP_OKAY)
            elif k == "prod_jump":
                ring.shared.rsp_prod = (ring.rsp_prod_pvt + size + self.rng.randint(1, 1 << 20)) & _MASK32
                self._notify(queue)
                return
            elif k == "prod_back":
                ring.shared.rsp_prod = (ring.rsp_prod_pvt - self.rng.randint(1, size)) & _MASK32
                self._notify(queue)
                return
        ring.shared.rsp_prod = ring.rsp_prod_pvt
        self._notify(queue)


# ---------------------------------------------------------------------------------------------
# The process: JSON commands on stdin
# ---------------------------------------------------------------------------------------------


def _serve(platform, cmd: dict) -> dict:
    image = cmd.get("image", {})
    offer = Offer(**cmd.get("offer", {}))
    hostile = Hostile(**cmd["hostile"]) if cmd.get("hostile") else None
    session = BackendSession(
        platform, cmd["backend"], offer,
        sectors=image.get("sectors", 8192), sector_size=image.get("sector_size", 512),
        seed=image.get("seed", 1), hostile=hostile, session_timeout=cmd.get("session_timeout", 30.0),
    )
    try:
        session.run()
    finally:
        session.close()
    return {
        "event": "done", "malformed": session.malformed, "fatal_sent": session.fatal_sent,
        "kinds": session.kinds, "error": session.error, "answered": session.answered,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-dir", required=True)
    parser.add_argument("--domid", type=int, default=0)
    args = parser.parse_args(argv)
    from xentools.platform.sim.platform import SoftwarePlatform

    platform = SoftwarePlatform(args.sim_dir, args.domid)
    print(json.dumps({"event": "ready"}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        if cmd.get("cmd") == "serve":
            try:
                reply = _serve(platform, cmd)
            except Exception as err:  # report, keep serving: the test decides
                reply = {"event": "done", "error": f"crash: {err!r}", "malformed": 0, "fatal_sent": False, "kinds": {}}
            print(json.dumps(reply), flush=True)
    return 0


class BackendProcess:
    """Run this module in its own process and talk to it (for tests)."""

    def __init__(self, sim_dir: str, domid: int = 0) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--sim-dir", sim_dir, "--domid", str(domid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self._pending = b""
        ready = self._line(20.0)
        if ready.get("event") != "ready":
            raise RuntimeError(f"backend process said {ready!r}")

    def _line(self, timeout: float) -> dict:
        """The next JSON line, read with os.read (no hidden buffer select cannot see)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"backend process silent for {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"backend process exited ({self.proc.wait()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def _send(self, obj: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def serve(self, backend: str, *, offer: dict | None = None, image: dict | None = None,
              hostile: dict | None = None, session_timeout: float = 30.0) -> None:
        self._send({
            "cmd": "serve", "backend": backend, "offer": offer or {}, "image": image or {},
            "hostile": hostile, "session_timeout": session_timeout,
        })

    def wait_done(self, timeout: float = 30.0) -> dict:
        return self._line(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send({"cmd": "quit"})
                self.proc.wait(5)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


if __name__ == "__main__":
    sys.exit(main())
