"""blkback's compiled ring loop, seen from Python: load it if it was built, and drive it.

Owns: `compiled()` (the cffi extension xentools.devices._blkback_ringloop built by
bindings/build_ringloop.py from blkback_ringloop.c, or None where it was not built, was built
from other C sources than those beside it (`source_hash`: one line on stderr), or
XENTOOLS_RINGLOOP=python asks for the pure-Python path), `choose_reads` (how a ring reads a
regular image: mapped windows or preadv, set or measured: READS), `layout_of` (struct xt_layout
filled from xentools.core.blkif's Abi: the C code has no layout of its own), `GrefTable`
(the C hash table ref -> mapped page that blkback_grants.SegmentMapper keeps in step with
its persistent-grant cache), `CompiledRing` (one ring's call into the loop, and its
struct xt_image: reads copied from mapped windows of MAP_WINDOW bytes of a regular image
file), `set_map_budget` and `map_usage` (the windows mapped now: one pool for the whole
process, at most MAP_WINDOWS of them, so blkback's resident memory is flat in the image's
size and the number of queues).
Must not: judge a request, count a rule or answer anything the C loop left: the queue's
Python path does (blkback_queue.QueueWorker._serve_compiled), and stays the authority.

What the loop serves (blkback_ringloop.c): READ/WRITE requests, direct or INDIRECT (up to
1024 segments), that pass every check of blkback_validate (parse_request,
parse_indirect_segments) and whose refs, indirect pages included, are all cached; it stops at the first
other request and leaves it unconsumed. Each call (`CompiledRing.run`, xt_pass) also reads
req_prod, publishes the responses and arms req_event as ring.h's consumer loop does, and says
whether to notify. `CompiledRing.wait` (xt_wait) is the ring thread's wait loop on direct event
channels (`attach_events` with EventChannels.direct_link: the software Xen's words, or real
Xen's libxenevtchn handle): it watches its event word (real Xen: req_prod) for a while
(`set_spin`, SPIN_US; real Xen XEN_SPIN_US, off by default), sleeps, takes and unmasks events,
serves (xt_pass's loop), publishes every few responses and notifies, returning WAIT_* flags for
what is Python's. tests/test_blkback_ringloop.py feeds the same random and hostile rings to both
paths and requires the same responses, data and report.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path
from typing import Any

from xentools.core.blkif import BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, Abi

__all__ = [
    "MAP_WINDOW", "MAP_WINDOWS", "STOP_ERROR", "STOP_PYTHON", "STOP_RING", "STOP_WAIT", "WAIT_EVTCHN", "WAIT_NOTIFY",
    "WAIT_STOP", "WAIT_TIMEOUT", "WAIT_UNMASK", "WAIT_WAKE", "CompiledRing", "GrefTable",
    "READS_CHOICES", "READS_ENV", "SPIN_ENV", "SPIN_US_RANGE", "XEN_SPIN_ENV", "choose_reads", "compiled", "evt_of", "layout_of", "map_usage",
    "reads_setting", "set_map_budget", "set_reads", "set_spin", "set_xen_spin", "source_hash", "xen_spin_from_env",
]

STOP_PYTHON = 1  # a request for the Python path (another operation, a broken rule, a ref not cached)
STOP_WAIT = 2  # its data is not in the page cache: an I/O thread's job
STOP_ERROR = 3  # the image failed: the Python path redoes it and answers the error
STOP_RING = 4  # req_prod overflows the ring (xt_pass): the Python BackRing judges it
# What ended an xt_wait (flags, blkback_ringloop.c): *stop set; a wake fd readable; the
# timeout; the event channel needs the Python handle (a CLOSED or unbound word), which
# then owes a notify and/or an unmask.
WAIT_STOP, WAIT_WAKE, WAIT_TIMEOUT, WAIT_EVTCHN, WAIT_NOTIFY, WAIT_UNMASK = 1, 2, 4, 8, 16, 32
MAP_WINDOW = 2 << 20  # bytes of the image per mapped window (blkback_ringloop.c, struct xt_pool)
# Windows mapped at once in the whole process (every queue of every image), least recently
# used unmapped first: at most 64 MiB of mapped page cache counted in blkback's RSS, whatever
# the images' sizes and the number of queues (`blkback serve --map-budget-mib` sets it).
# Measured in a nested PV dom0 (TCG): mapping a window again costs as much as preadv's copy
# (2 MiB windows mapped, faulted, copied and unmapped: 139-289 MB/s; preadv 255-274 MB/s; a
# copy from a window that stays mapped 1335-2433 MB/s), so a budget smaller than the data
# read over and over gives up the windows' speed there. On hardware both run at memory speed.
MAP_WINDOWS = 32
MAP_BUDGET_MIB_RANGE = (8, 96)  # what set_map_budget accepts (4 .. 48 windows of 2 MiB)

# wait() watches the ring's event word for up to SPIN_US microseconds before it sleeps, the
# watch adapting as a halt-polling window does (blkback_ringloop.c, xt_wait): waking a thread
# that sleeps on an idle CPU costs more than the watch (`blkback serve --spin-us`).
SPIN_US = 200
SPIN_US_RANGE = (0, 1000)
# ... but not after requests that averaged more than WATCH_BYTES: the frontend answers them
# only once it has handled their data, and a watch meanwhile takes the CPU it and the I/O
# need (1 MiB sequential: 0.53-0.57 of raw pread with the watch, 0.84 without, on 2 vCPUs).
WATCH_BYTES = 64 << 10
SPIN_ENV = "XENTOOLS_BLKBACK_SPIN_US"
# On real Xen (a link of kind "xenevtchn") the watch looks at the ring's req_prod instead of an
# event word (the pending bit is the hypervisor's), and is off unless asked: XEN_SPIN_US, or
# $XENTOOLS_BLKBACK_XEN_SPIN_US read once at start (xen_spin_from_env).
XEN_SPIN_US = 0
XEN_SPIN_ENV = "XENTOOLS_BLKBACK_XEN_SPIN_US"

# How the loop reads a regular image file (`blkback serve --reads`, else $XENTOOLS_BLKBACK_READS,
# else "auto"): "windows" copies from mapped windows (above), "preadv" reads straight into the
# granted pages (preadv2 RWF_NOWAIT for requests over inline_bytes: not in the page cache, an
# I/O thread's), "auto" measures once per file system (xt_probe_reads, PROBE_BYTES of the
# image from the page cache both ways) and takes the windows only where copying from a mapping
# is WINDOWS_SPEEDUP times faster than preadv: under QEMU TCG (nested dom0) it is ~10x; on
# hardware 1.5x (ext4) to 2.4x (tmpfs), where a window not reused (a pass over an image larger
# than the budget) costs more than preadv and its mapped page cache counts in blkback's RSS.
READS_ENV = "XENTOOLS_BLKBACK_READS"
READS_CHOICES = ("auto", "windows", "preadv")
READS: str | None = None  # set_reads(); None: the environment's, else "auto"
PROBE_BYTES = 256 * 1024
WINDOWS_SPEEDUP = 4.0
_measured: dict[int, dict[str, Any]] = {}  # st_dev -> the probe's verdict, once per file system

_LAYOUT_FIELDS = (
    "entry_size", "request_size", "response_size",
    "req_operation", "req_nr_segments", "req_id", "req_sector_number", "req_seg",
    "segment_size", "seg_gref", "seg_first_sect", "seg_last_sect",
    "rsp_id", "rsp_operation", "rsp_status",
    "indirect_indirect_op", "indirect_nr_segments", "indirect_id", "indirect_sector_number", "indirect_grefs",
)

# (wire operation, operation, struct xt_stats prefix)
_KINDS = (
    (BLKIF_OP_READ, BLKIF_OP_READ, "read"),
    (BLKIF_OP_WRITE, BLKIF_OP_WRITE, "write"),
    (BLKIF_OP_INDIRECT, BLKIF_OP_READ, "indirect_read"),
    (BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, "indirect_write"),
)

_loaded: Any = None
_tried = False
# The C sources the module is built from (bindings/build_ringloop.py stores their hash in it).
SOURCES = ("blkback_ringloop.c", "blkback_ringloop.h", "blkfront_ringloop.c", "blkfront_ringloop.h")


def source_hash(directory: Path | None = None) -> str | None:
    """The hash of SOURCES in `directory` (default: beside this module), or None where one is
    missing (an install without them: nothing to compare)."""
    where = directory or Path(__file__).resolve().parent
    crc, length = 0, 0
    for name in SOURCES:  # CRC-32 and length: hashlib would load libcrypto into blkback's RSS
        try:
            data = (where / name).read_bytes()
        except OSError:
            return None
        crc, length = zlib.crc32(data, crc), length + len(data)
    return f"{crc:08x}-{length:x}"


def _stale(module: Any) -> str | None:
    """Why `module` must not be used (built from other sources than those beside it), or None."""
    expected = source_hash()
    if expected is None:
        return None
    try:
        built = module.ffi.string(module.lib.xt_source_hash()).decode()
    except AttributeError:  # built before the hash was stored
        built = None
    if built == expected:
        return None
    return (f"xentools: the compiled ring loop {Path(module.__file__).name} is older than its C sources"
            " (xentools/devices/blk*_ringloop.[ch]): run `make ringloop`; using the pure-Python path")


def compiled() -> Any:
    """The extension module (`.ffi`, `.lib`), or None: not built here, built from other C
    sources than those beside it (said once on stderr), or the environment says
    XENTOOLS_RINGLOOP=python."""
    global _loaded, _tried
    if os.environ.get("XENTOOLS_RINGLOOP", "") == "python":
        return None
    if not _tried:
        _tried = True
        try:
            from xentools.devices import _blkback_ringloop  # type: ignore[attr-defined]
        except ImportError:
            _loaded = None
        else:
            problem = _stale(_blkback_ringloop)
            if problem:
                print(problem, file=sys.stderr)
            _loaded = None if problem else _blkback_ringloop
    return _loaded


_WAIT_COUNTERS = ("sleeps", "events", "notifies", "rounds", "spins", "unwatched")  # struct xt_evt's


def evt_of(ffi: Any, link: Any, wake_fds: tuple[int, int], previous: Any) -> Any:
    """A struct xt_evt for the compiled event transitions (xt_evt_take, xt_evt_notify) over
    `link` (EventChannels.direct_link: kind "words", the software Xen's words, doorbell and
    bits; kind "xenevtchn", real Xen's libxenevtchn handle, fd, port and the library's
    functions), `wake_fds` readable ending a wait, the counters going on from `previous` (or
    None). blkback's wait loop and blkfront's batch wait both build theirs here. The struct
    holds raw addresses: the link's handle must outlive its use."""
    evt = ffi.new("struct xt_evt *")
    evt.foreign = -1
    if link.kind == "xenevtchn":
        evt.kind = ffi.integer_const("XT_EVT_XENEVTCHN")
        evt.doorbell, evt.own_ring, evt.peer_ring = link.fd, -1, -1
        evt.xce = ffi.cast("void *", link.handle)
        evt.xce_pending = ffi.cast("int (*)(void *)", link.pending_fn)
        evt.xce_unmask = ffi.cast("int (*)(void *, uint32_t)", link.unmask_fn)
        evt.xce_notify = ffi.cast("int (*)(void *, uint32_t)", link.notify_fn)
        evt.port = link.port
        evt.own_word = evt.peer_word = ffi.addressof(evt[0], "zero")  # never set: no watch of it
        evt.tries = 1
    elif link.kind == "words":
        evt.kind = ffi.integer_const("XT_EVT_WORDS")
        evt.doorbell, evt.own_ring, evt.peer_ring = link.doorbell, link.own_ring, link.peer_ring
        evt.own_word = ffi.cast("uint32_t *", link.own_word)
        evt.peer_word = ffi.cast("uint32_t *", link.peer_word)
        evt.pending, evt.masked, evt.ready, evt.bound, evt.closed = (
            link.pending, link.masked, link.ready, link.bound, link.closed)
        evt.tries = link.tries
    else:
        raise ValueError(f"an event channel link of kind {link.kind!r} is neither words nor xenevtchn")
    evt.wake_fds = list(wake_fds)
    if previous is not None:
        for name in _WAIT_COUNTERS:
            setattr(evt, name, getattr(previous, name))
    return evt


def layout_of(module: Any, abi: Abi) -> Any:
    """A struct xt_layout with the offsets of `abi` (the one codec's numbers)."""
    layout = module.ffi.new("struct xt_layout *")
    for name in _LAYOUT_FIELDS:
        setattr(layout, name, getattr(abi, name))
    return layout


def _spin_in_range(us: int) -> int:
    """`us` when it is in SPIN_US_RANGE; ValueError otherwise (both watches' one check)."""
    low, high = SPIN_US_RANGE
    if not low <= us <= high:
        raise ValueError(f"a watch of {us} us before sleeping is outside {low}..{high} us")
    return us


def set_spin(us: int) -> None:
    """The longest watch of the event word before wait() sleeps, in microseconds (0: never
    watch), for rings attached afterwards; ValueError outside SPIN_US_RANGE."""
    global SPIN_US
    SPIN_US = _spin_in_range(us)


def set_xen_spin(us: int) -> None:
    """set_spin's watch for rings on real Xen's event channels (XEN_SPIN_US)."""
    global XEN_SPIN_US
    XEN_SPIN_US = _spin_in_range(us)


def xen_spin_from_env() -> None:
    """Take $XENTOOLS_BLKBACK_XEN_SPIN_US (microseconds, SPIN_US_RANGE) when set; ValueError,
    one line naming the variable, for anything else."""
    value = os.environ.get(XEN_SPIN_ENV, "").strip()
    if not value:
        return
    try:
        set_xen_spin(int(value))
    except ValueError:
        low, high = SPIN_US_RANGE
        raise ValueError(f"{XEN_SPIN_ENV}={value!r} is not a whole number of microseconds in {low}..{high}") from None


def set_map_budget(mib: int) -> None:
    """The window pool's budget for this process, in MiB (rounded down to whole windows);
    ValueError outside MAP_BUDGET_MIB_RANGE. Takes effect for rings connected afterwards."""
    global MAP_WINDOWS
    low, high = MAP_BUDGET_MIB_RANGE
    if not low <= mib <= high:
        raise ValueError(f"a window budget of {mib} MiB is outside {low}..{high} MiB")
    MAP_WINDOWS = mib * (1 << 20) // MAP_WINDOW


def reads_setting() -> str:
    """"auto", "windows" or "preadv": set_reads()'s, else $XENTOOLS_BLKBACK_READS's, else auto.
    ValueError for another value in the environment."""
    setting = READS if READS is not None else os.environ.get(READS_ENV, "") or "auto"
    if setting not in READS_CHOICES:
        raise ValueError(f"{READS_ENV}={setting!r} is not one of {', '.join(READS_CHOICES)}")
    return setting


def set_reads(setting: str) -> None:
    """How rings connected afterwards read (READS_CHOICES); ValueError for another value."""
    global READS
    if setting not in READS_CHOICES:
        raise ValueError(f"reads {setting!r} is not one of {', '.join(READS_CHOICES)}")
    READS = setting


def choose_reads(module: Any, fd: int, disk_bytes: int) -> dict[str, Any]:
    """How a ring over image `fd` reads: {"reads": "windows" | "preadv", "how": ...} and, when
    measured, both times in microseconds (see READS)."""
    setting = reads_setting()
    if setting != "auto":
        choice: dict[str, Any] = {"reads": setting, "how": "set"}
    else:
        try:
            device = os.fstat(fd).st_dev
        except OSError:
            device = -1
        choice = _measured.get(device) or _probe(module, fd, disk_bytes)
        if "preadv_us" in choice:
            _measured[device] = choice
    return choice


def _probe(module: Any, fd: int, disk_bytes: int) -> dict[str, Any]:
    preadv_ns = module.ffi.new("uint64_t *")
    copy_ns = module.ffi.new("uint64_t *")
    if module.lib.xt_probe_reads(fd, disk_bytes, PROBE_BYTES, preadv_ns, copy_ns) != 0:
        return {"reads": "preadv", "how": f"auto: not measured (no {PROBE_BYTES >> 10} KiB run of data in a "
                                          "regular file)"}
    read_us, copy_us = preadv_ns[0] / 1000, copy_ns[0] / 1000
    windows = preadv_ns[0] >= WINDOWS_SPEEDUP * copy_ns[0]
    return {"reads": "windows" if windows else "preadv",
            "how": f"auto: windows if a copy from a mapping is >= {WINDOWS_SPEEDUP:g}x faster than preadv",
            "probe_kib": PROBE_BYTES >> 10, "preadv_us": round(read_us, 1), "window_copy_us": round(copy_us, 1)}


def map_usage(module: Any) -> dict[str, int]:
    """The process's window pool now: windows mapped, the most there may be, bytes each."""
    mapped = module.ffi.new("uint32_t *")
    budget = module.ffi.new("uint32_t *")
    window = module.ffi.new("uint64_t *")
    module.lib.xt_map_usage(mapped, budget, window)
    return {"mapped_windows": int(mapped[0]), "max_windows": int(budget[0]), "window_bytes": int(window[0])}


class GrefTable:
    """ref -> address of its mapped 4 KiB page, for the C loop. Holds addresses only (no
    buffer export, so the mapping can be unmapped); the owner removes a ref before it
    unmaps its page."""

    def __init__(self, module: Any, entries: int) -> None:
        self._ffi = module.ffi
        self._lib = module.lib
        self._table = module.ffi.gc(module.lib.xt_table_new(max(1, entries)), module.lib.xt_table_free)
        if self._table == module.ffi.NULL:
            raise MemoryError("xt_table_new")
        self.ptr = self._table

    def put(self, ref: int, page: memoryview) -> None:
        address = int(self._ffi.cast("uintptr_t", self._ffi.from_buffer(page)))
        if self._lib.xt_table_put(self._table, ref, address) != 0:
            raise RuntimeError("the gref table is full (it is sized for the whole cache)")

    def remove(self, ref: int) -> None:
        self._lib.xt_table_del(self._table, ref)

    def clear(self) -> None:
        self._lib.xt_table_clear(self._table)

    def __len__(self) -> int:
        return int(self._lib.xt_table_count(self._table))


class CompiledRing:
    """One ring's call into the C loop: the layout, policy, table and ring address are set
    once; run() runs it from the BackRing's req_cons / rsp_prod_pvt and writes both
    back. The ring's mapping must outlive this object's use (QueueWorker drops it first)."""

    def __init__(self, module: Any, abi: Abi, *, disk_bytes: int, unit: int, readonly: bool, max_indirect_segments: int,
                 table: GrefTable, ring_buf: memoryview, nr_ents: int, fd: int, inline_bytes: int) -> None:
        ffi, self._lib = module.ffi, module.lib
        self._ffi = ffi
        self._layout = layout_of(module, abi)
        policy = ffi.new("struct xt_policy *")
        policy.disk_bytes = disk_bytes
        policy.unit = unit
        policy.units_per_page = 4096 // unit
        policy.readonly = 1 if readonly else 0
        policy.max_indirect_segments = max_indirect_segments
        self._policy = policy
        self._table = table
        # The address only: holding a buffer export would stop the ring from being unmapped.
        self._sring = ffi.cast("uint8_t *", int(ffi.cast("uintptr_t", ffi.from_buffer(ring_buf))))
        self._nr_ents = nr_ents
        self._fd = fd
        self._inline = min(inline_bytes, (1 << 64) - 1)
        # Reads copied from mapped windows of the image where choose_reads says so (NULL: preadv;
        # also for what is not a regular file).
        self.reads = choose_reads(module, fd, disk_bytes)
        self._image = ffi.NULL
        if self.reads["reads"] == "windows":
            if self._lib.xt_map_configure(MAP_WINDOW, MAP_WINDOWS) != 0:
                raise ValueError(f"window pool: {MAP_WINDOWS} windows of {MAP_WINDOW} bytes is outside its limits")
            image = self._lib.xt_image_new(fd, disk_bytes)
            self._image = ffi.gc(image, self._lib.xt_image_free) if image != ffi.NULL else ffi.NULL
        self._cons = ffi.new("uint32_t *")
        self._prod = ffi.new("uint32_t *")
        self._stop = ffi.new("int *")
        self._notify = ffi.new("int *")
        self.stats = ffi.new("struct xt_stats *")
        self._evt: Any = None  # struct xt_evt, once attach_events() gave the event channel
        self.link_generation = -1
        self.totals: dict[tuple[int, int], int] = {}  # (wire op, op) -> requests served, ever

    def run(self, ring: Any) -> tuple[int, int, bool]:
        """One pass of xt_pass over BackRing `ring` (its answers written before are published
        too): returns (served, stop, whether to notify the frontend)."""
        self._cons[0] = ring.req_cons
        self._prod[0] = ring.rsp_prod_pvt
        served = self._lib.xt_pass(
            self._layout, self._policy, self._table.ptr, self._sring, self._nr_ents, self._cons, self._prod,
            self._fd, self._image, self._inline, self.stats, self._stop, self._notify,
        )
        ring.req_cons = self._cons[0]
        ring.rsp_prod_pvt = self._prod[0]
        return served, self._stop[0], bool(self._notify[0])

    def attach_events(self, link: Any, wake_fds: tuple[int, int]) -> None:
        """Let wait() take, unmask and send the ring's events itself through `link`
        (EventChannels.direct_link, either kind); `wake_fds` readable end a wait."""
        evt = evt_of(self._ffi, link, wake_fds, self._evt)  # the counters go on
        # The watch starts at its longest: from 0 it grows only after short sleeps, and a
        # frontend that waits for a sleeping backend's wake-ups sleeps long (a batch of 32
        # 4 KiB reads: ~200 us on 2 vCPUs), so it could stay at 0.
        evt.spin_max_ns = evt.spin_ns = (XEN_SPIN_US if link.kind == "xenevtchn" else SPIN_US) * 1000
        evt.watch_bytes = WATCH_BYTES
        self._evt = evt
        self.link_generation = link.generation
        self._flags = self._ffi.new("uint32_t *")

    def detach_events(self) -> None:
        self._evt_off = self._evt
        self._evt = None

    @property
    def events_attached(self) -> bool:
        return self._evt is not None

    def take_foreign(self) -> int | None:
        """A port other than the ring's that wait() took on real Xen and left masked (bound
        on the handle after the link was taken), once; None when there is none."""
        evt = self._evt
        if evt is None or evt.foreign < 0:
            return None
        port, evt.foreign = int(evt.foreign), -1
        return port

    def wait(self, ring: Any, timeout_ms: int, publish_every: int, publish_bytes: int) -> tuple[int, int, int]:
        """xt_wait over BackRing `ring`: serve, publish every `publish_every` responses (or
        once they moved `publish_bytes`) and notify, sleep on the event channel, take and unmask its events, again, until
        something is Python's. Returns (served, stop, WAIT_* flags)."""
        self._cons[0] = ring.req_cons
        self._prod[0] = ring.rsp_prod_pvt
        served = self._lib.xt_wait(
            self._layout, self._policy, self._table.ptr, self._sring, self._nr_ents, self._cons, self._prod,
            self._fd, self._image, self._inline, self.stats, self._stop, self._evt, timeout_ms, publish_every,
            publish_bytes, self._flags,
        )
        ring.req_cons = self._cons[0]
        ring.rsp_prod_pvt = self._prod[0]
        return served, self._stop[0], self._flags[0]

    @property
    def wait_profile(self) -> dict[str, int]:
        """Sleeps, events taken, notifies sent, serving rounds of wait(), events caught
        while watching before a sleep (spins), and sleeps without a watch after large
        requests (unwatched), ever."""
        evt = self._evt if self._evt is not None else getattr(self, "_evt_off", None)
        return {name: int(getattr(evt, name)) if evt is not None else 0 for name in _WAIT_COUNTERS}

    def forget(self, offset: int, length: int) -> None:
        """Unmap the windows over [offset, offset + length) (after a discard punched holes
        there: read through a mapping, a tmpfs hole would get memory). Ring thread only."""
        if self._image != self._ffi.NULL:
            self._lib.xt_image_forget(self._image, offset, length)

    @property
    def mapped_windows(self) -> int:
        """Windows of this ring's image file mapped now (0 without a mapping)."""
        return int(self._lib.xt_image_mapped(self._image)) if self._image != self._ffi.NULL else 0

    def close(self) -> None:
        """Unmap the image's windows (no call into the loop may follow)."""
        image, self._image = self._image, self._ffi.NULL
        if image != self._ffi.NULL:
            self._ffi.release(image)

    @property
    def profile(self) -> dict[str, float]:
        """Reads copied from the mapped windows, seconds in the loop and, of them, moving
        the data of requests larger than inline_bytes, since this ring was connected."""
        s = self.stats
        return {"mapped_reads": int(s.mapped_reads), "loop_s": s.serve_ns / 1e9, "io_s": s.io_ns / 1e9}

    def take_stats(self) -> list[tuple[int, int, int, int, int]]:
        """(wire operation, operation, requests, segments, bytes) of each kind of request
        served since the last call (kinds with no request left out)."""
        s = self.stats
        out = []
        for wire, op, prefix in _KINDS:
            count = getattr(s, prefix + "s")
            if count:
                out.append((wire, op, count, getattr(s, prefix + "_segments"), getattr(s, prefix + "_bytes")))
                self.totals[wire, op] = self.totals.get((wire, op), 0) + count
                setattr(s, prefix + "s", 0)
                setattr(s, prefix + "_segments", 0)
                setattr(s, prefix + "_bytes", 0)
        return out
