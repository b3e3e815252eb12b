"""`xentools bench`: blkfront throughput against raw pread of the same image, same run.

Owns: the `bench` command and its measurements: sequential 1 MiB reads (MB/s, divided by a
plain os.pread loop over the same image file) and random 4 KiB reads at queue depth 32
(IOPS, divided by a plain Python os.pread loop over the same offsets), each through
blkfront's batch API (BlkFront.batch_io: the headline figures; sequential reads also with
the data left in the granted pages; random reads through read_many, every offset in one
call into one buffer, sampled places checked against pread, and through the API's rounds
of read_sectors and reap_tags) and through its future API; the CPU time each
process of the rig (frontend, backend, grantd, xenstored) spent per request in each
measurement, from /proc/<pid>/stat; and an event channel round trip A->B->A
between two processes of the software Xen, against a socketpair ping-pong between the same
two processes in the same run. The image is read once first, so both sides read from the
page cache. Every figure is measured in interleaved rounds (a reference, then the figures
divided by it), and the medians are reported: one measurement swings with where the two
vCPUs' threads run, a median of rounds much less. Each target is judged from its rounds
(bench_verdict: met, missed or undecided, with the median's confidence interval). The
configuration says whether blkback served the rings through its compiled ring loop and blkfront filled and reaped them through
its compiled fill and reap, or both took their pure-Python paths (XENTOOLS_RINGLOOP=python
asks for the latter), and the grant budget: the frontend's pool (lanes included) never
exceeds the backend's persistent-grant cache. With `--json`, one JSON object on stdout with the figures, the ratios and the
configuration used.
Must not: be a test: nothing here asserts a target; it measures and reports.
"""

from __future__ import annotations

import json
import os
import platform as host
import random
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import click

from xentools.core.blkif import BLKIF_MAX_SEGMENTS_PER_REQUEST, indirect_pages_for
from xentools.devices.blkback_grants import DEFAULT_MAX_PERSISTENT_GRANTS
from xentools.devices.blkback_ringloop import compiled
from xentools.devices.blkfront import BlkFront, BlkfrontConfig, BlkFuture
from xentools.devices.blkfront_batch import BatchIO
from xentools.platform.interface import EventChannels
from xentools.tools.bench_verdict import verdict, verdict_line
from xentools.tools.demo import BACKEND_DOMID, FRONTEND_DOMID, MIB, DemoError, LocalRig

TARGETS = {
    "seq_read_1m_ratio": 0.7,
    "rand_read_4k_qd32_ratio": 0.35,
    "rand_read_4k_cpu_us_per_request_total": 3.0,
}
LOWER_IS_BETTER = {"rand_read_4k_cpu_us_per_request_total"}  # the other targets are floors
EVENT_ROUND_TRIPS = 2000
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads, dead ones included),
    from fields 14 and 15 of /proc/<pid>/stat (proc(5))."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: fields follow the last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class CpuMeter:
    """CPU time used by named processes since start(), per request."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def per_request_us(self, requests: int) -> dict[str, float]:
        """CPU microseconds per request of each process since start(), and their total."""
        used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        out = {name: round(seconds * 1e6 / max(requests, 1), 2) for name, seconds in used.items()}
        out["total"] = round(sum(used.values()) * 1e6 / max(requests, 1), 2)
        return out


def _wait_event(evtchn: EventChannels, timeout: float = 10.0) -> int:
    """Wait for one event on `evtchn`, take it and unmask it (as a device does)."""
    while True:
        port = evtchn.pending()
        if port is not None:
            evtchn.unmask(port)
            return port
        if not select.select([evtchn], [], [], timeout)[0]:
            raise DemoError("bench.event_timeout", f"no event after {timeout} s")


def echo_peer(root_dir: str, domid: int, remote_domid: int, remote_port: int, sock_fd: int,
              count: int) -> None:
    """The B side of the event round trip (run in its own process): bind to `remote_port`,
    answer `count` events with a notify, then answer `count` bytes on the socket."""
    from xentools.platform.sim.platform import SoftwarePlatform  # the CLI imports us eagerly

    sock = socket.socket(fileno=sock_fd)
    evtchn = SoftwarePlatform(root_dir, domid).open_evtchn()
    try:
        port = evtchn.bind_interdomain(remote_domid, remote_port)
        _wait_event(evtchn)  # the event bind_interdomain raises on the new port
        sock.sendall(b"R")
        for _ in range(count):
            _wait_event(evtchn)
            evtchn.notify(port)
        for _ in range(count):
            sock.recv(1)
            sock.send(b"x")
    finally:
        evtchn.close()
        sock.close()


def event_round_trip(root_dir: str, count: int = EVENT_ROUND_TRIPS) -> dict[str, float]:
    """Microseconds per event channel round trip A->B->A between this process (domain 0) and
    a child process (domain 1), and per socketpair ping-pong between the same two processes."""
    from xentools.platform.sim.platform import SoftwarePlatform  # the CLI imports us eagerly

    evtchn = SoftwarePlatform(root_dir, BACKEND_DOMID).open_evtchn()
    mine, theirs = socket.socketpair()
    child = None
    try:
        port = evtchn.bind_unbound(FRONTEND_DOMID)
        code = (
            "import sys; from xentools.tools.bench import echo_peer; "
            "echo_peer(sys.argv[1], *map(int, sys.argv[2:]))"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, root_dir, str(FRONTEND_DOMID), str(BACKEND_DOMID),
             str(port), str(theirs.fileno()), str(count + 50)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
        )
        theirs.close()
        mine.settimeout(30)
        if mine.recv(1) != b"R":
            raise DemoError("bench.echo_peer", "the echo process did not start")
        mine.settimeout(None)  # the reference is a plain blocking ping-pong (EOF if it dies)

        def events(n: int) -> float:
            started = time.perf_counter()
            for _ in range(n):
                evtchn.notify(port)
                _wait_event(evtchn)
            return time.perf_counter() - started

        def packets(n: int) -> float:
            started = time.perf_counter()
            for _ in range(n):
                mine.send(b"x")
                mine.recv(1)
            return time.perf_counter() - started

        events(50)
        event_us = events(count) * 1e6 / count
        packets(50)
        socketpair_us = packets(count) * 1e6 / count
        if child.wait(timeout=30) != 0:
            raise DemoError("bench.echo_peer", f"the echo process exited with {child.returncode}")
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        mine.close()
        theirs.close()
        evtchn.close()
    return {
        "event_round_trip_us": round(event_us, 2),
        "socketpair_round_trip_us": round(socketpair_us, 2),
        "event_round_trip_ratio": round(event_us / socketpair_us, 2),
        "round_trips": count,
    }


def _timed(duration: float, one_pass: Callable[[], int]) -> tuple[int, float]:
    """Run one_pass() (returning units done) until `duration` seconds have passed."""
    done = 0
    started = time.perf_counter()
    while True:
        done += one_pass()
        elapsed = time.perf_counter() - started
        if elapsed >= duration:
            return done, elapsed


def raw_seq(fd: int, size: int, duration: float) -> float:
    """MB/s of os.pread(fd, 1 MiB, offset) over the file, in order."""
    def one_pass() -> int:
        for offset in range(0, size, MIB):
            os.pread(fd, MIB, offset)
        return size

    nbytes, seconds = _timed(duration, one_pass)
    return nbytes / seconds / 1e6


def raw_rand(fd: int, offsets: list[int], duration: float) -> float:
    """IOPS of a plain Python loop of os.pread(fd, 4096, offset)."""
    def one_pass() -> int:
        for offset in offsets:
            os.pread(fd, 4096, offset)
        return len(offsets)

    ops, seconds = _timed(duration, one_pass)
    return ops / seconds


def _chained(dev: BlkFront, requests: list[tuple[int, int]], depth: int, timeout: float) -> float:
    """Submit `requests` (sector, count) with `depth` in flight: each completion callback
    submits the next one (on the completion thread, pushed with the rest of its pass).
    Returns the seconds taken. Every read must succeed."""
    total = len(requests)
    state = {"next": 0, "done": 0, "error": None}
    finished = threading.Event()

    def complete(fut: BlkFuture) -> None:
        if fut.exception() is not None and state["error"] is None:
            state["error"] = fut.exception()
        state["done"] += 1
        if state["done"] == total or state["error"] is not None:
            finished.set()
            return
        index = state["next"]
        if index < total:
            state["next"] = index + 1
            dev.submit_read(*requests[index], callback=complete)

    started = time.perf_counter()
    with dev.batch():
        for index in range(min(depth, total)):
            state["next"] = index + 1
            dev.submit_read(*requests[index], callback=complete)
    if not finished.wait(timeout):
        raise DemoError("bench.timeout", f"{total - state['done']} reads not done after {timeout} s")
    if state["error"] is not None:
        raise DemoError("bench.read_failed", str(state["error"]))
    return time.perf_counter() - started


def blk_seq(dev: BlkFront, size: int, depth: int, duration: float) -> float:
    """MB/s of 1 MiB reads through the future API (one future per read, `depth` in flight)."""
    requests = [(offset // 512, MIB // 512) for offset in range(0, size, MIB)]
    nbytes, seconds = _timed(duration, lambda: (_chained(dev, requests, depth, 120), size)[1])
    return nbytes / seconds / 1e6


def blk_rand(dev: BlkFront, offsets: list[int], depth: int, duration: float) -> float:
    """IOPS of 4 KiB reads through the future API (one future per read, `depth` in flight)."""
    requests = [(offset // 512, 8) for offset in offsets]
    ops, seconds = _timed(duration, lambda: (_chained(dev, requests, depth, 120), len(requests))[1])
    return ops / seconds


def _batched(io: BatchIO, sectors: list[int], into_pool: bool = False) -> int:
    """Read `request_bytes` at every sector of `sectors` through the batch API, keeping the
    lanes busy: submit on every free lane, reap what completed (at least a quarter of the
    lanes: one wake-up per few requests), again. Reads go into the caller's buffers
    (registered, one per lane, copied into once: read_sectors, reap_tags) or, `into_pool`,
    stay in the lanes' granted pages. Returns the reads done; every one must succeed."""
    if into_pool:
        nsect = io.request_bytes // 512
        submit = lambda chunk: io.submit_reads([(sector, nsect) for sector in chunk])  # noqa: E731
    else:
        if not io.registered:
            io.register_buffers([bytearray(io.request_bytes) for _ in range(io.depth)])
        submit = io.read_sectors
    total = len(sectors)
    submitted = done = 0
    free = io.depth
    want = max(1, io.depth // 4)
    while done < total:
        if free and submitted < total:
            tags = submit(sectors[submitted : submitted + free])
            submitted += len(tags)
            free -= len(tags)
        completed, failed = io.reap_tags(min(want, total - done), 120)
        if failed:
            raise DemoError("bench.read_failed", f"batched reads failed (tag, status): {failed}")
        free += len(completed)
        done += len(completed)
    return done


def batch_seq(dev: BlkFront, size: int, depth: int, duration: float, *, into_pool: bool = False) -> float:
    """MB/s of 1 MiB reads through the batch API (`depth` lanes)."""
    sectors = [offset // 512 for offset in range(0, size, MIB)]
    with dev.batch_io(depth=depth, request_bytes=MIB) as io:
        nbytes, seconds = _timed(duration, lambda: _batched(io, sectors, into_pool) * MIB)
    return nbytes / seconds / 1e6


def batch_rand(dev: BlkFront, offsets: list[int], depth: int, duration: float) -> float:
    """IOPS of 4 KiB reads into the caller's buffers through the batch API (`depth` lanes,
    one registered buffer each)."""
    sectors = [offset // 512 for offset in offsets]
    with dev.batch_io(depth=depth, request_bytes=4096) as io:
        ops, seconds = _timed(duration, lambda: _batched(io, sectors))
    return ops / seconds


# read_many's calls: STREAM_CHUNK requests each, into one buffer of that many 4 KiB (16 MiB,
# whatever the image's size: the bench's process holds no copy of the image); after each call
# STREAM_SAMPLES of its places are compared with os.pread of the image (bench.wrong_data).
STREAM_CHUNK = 4096
RAND_OFFSETS = 20000  # the random 4 KiB reads' offsets, one pass
STREAM_SAMPLES = 16


def stream_rand(dev: BlkFront, fd: int, offsets: list[int], depth: int, duration: float, into: bytearray,
                checks: dict[str, int]) -> float:
    """IOPS of 4 KiB reads at `offsets` through BatchIO.read_many (`depth` lanes; one call
    per STREAM_CHUNK of them, into `into`, STREAM_CHUNK * 4 KiB). After each call
    STREAM_SAMPLES places are compared with os.pread of the image: checks["checked"] and
    checks["wrong_data"] count them (a mismatch is an error: bench() raises)."""
    sectors = [offset // 512 for offset in offsets]
    chunks = [(start, sectors[start : start + STREAM_CHUNK]) for start in range(0, len(sectors), STREAM_CHUNK)]
    rng = random.Random(len(offsets))
    with dev.batch_io(depth=depth, request_bytes=4096) as io:
        def one_pass() -> int:
            for start, chunk in chunks:
                io.read_many(chunk, into)
                for k in rng.sample(range(len(chunk)), min(STREAM_SAMPLES, len(chunk))):
                    checks["checked"] += 1
                    checks["wrong_data"] += into[k * 4096 : (k + 1) * 4096] != os.pread(fd, 4096, offsets[start + k])
            return len(offsets)

        ops, seconds = _timed(duration, one_pass)
    return ops / seconds


def _metered(meter: CpuMeter, dev: BlkFront, measure: Callable[[], float]) -> tuple[float, dict[str, float]]:
    """measure() and the CPU microseconds each process spent per request meanwhile."""
    meter.start()
    before = dev.stats["requests"]
    figure = measure()
    return figure, meter.per_request_us(dev.stats["requests"] - before)


# The figures of one round: (key, reference key or None, CPU key or None); a ratio's key is
# "<key less its _mbps/_iops>_ratio".
_FIGURES = (
    ("seq_read_1m_raw_pread_mbps", None, None),
    ("seq_read_1m_mbps", "seq_read_1m_raw_pread_mbps", "seq_read_1m_cpu_us_per_request"),
    ("seq_read_1m_into_pool_mbps", "seq_read_1m_raw_pread_mbps", "seq_read_1m_into_pool_cpu_us_per_request"),
    ("seq_read_1m_futures_mbps", "seq_read_1m_raw_pread_mbps", "seq_read_1m_futures_cpu_us_per_request"),
    ("rand_read_4k_raw_pread_iops", None, None),
    ("rand_read_4k_qd32_iops", "rand_read_4k_raw_pread_iops", "rand_read_4k_cpu_us_per_request"),
    ("rand_read_4k_qd32_rounds_iops", "rand_read_4k_raw_pread_iops", "rand_read_4k_rounds_cpu_us_per_request"),
    ("rand_read_4k_qd32_futures_iops", "rand_read_4k_raw_pread_iops", "rand_read_4k_futures_cpu_us_per_request"),
)


def _ratio_key(key: str) -> str:
    return key.rsplit("_", 1)[0] + "_ratio"


def _one_round(meter: CpuMeter, dev: BlkFront, fd: int, size: int, offsets: list[int], seq_lanes: int,
               seq_depth: int, rand_depth: int, seconds: float, into: bytearray, checks: dict[str, int]) -> dict:
    """Every figure once, each reference measured just before the figures divided by it, so
    that a round's ratios share the machine's state (its load, where the vCPUs run)."""
    figures: dict = {}
    measures: dict[str, Callable[[], float]] = {
        "seq_read_1m_raw_pread_mbps": lambda: raw_seq(fd, size, seconds),
        "seq_read_1m_mbps": lambda: batch_seq(dev, size, seq_lanes, seconds),
        "seq_read_1m_into_pool_mbps": lambda: batch_seq(dev, size, seq_lanes, seconds, into_pool=True),
        "seq_read_1m_futures_mbps": lambda: blk_seq(dev, size, seq_depth, seconds),
        "rand_read_4k_raw_pread_iops": lambda: raw_rand(fd, offsets, seconds),
        "rand_read_4k_qd32_iops": lambda: stream_rand(dev, fd, offsets, rand_depth, seconds, into, checks),
        "rand_read_4k_qd32_rounds_iops": lambda: batch_rand(dev, offsets, rand_depth, seconds),
        "rand_read_4k_qd32_futures_iops": lambda: blk_rand(dev, offsets, rand_depth, seconds),
    }
    for key, reference, cpu_key in _FIGURES:
        if reference is None:
            figures[key] = round(measures[key](), 1)
            continue
        figure, cpu = _metered(meter, dev, measures[key])
        figures[key] = round(figure, 1)
        figures[_ratio_key(key)] = round(figures[key] / figures[reference], 3)
        figures[cpu_key] = cpu
    return figures


def _combined(rounds: list[dict]) -> dict:
    """The headline figures over the rounds: each figure and each ratio the median of the
    rounds' (a ratio's median is taken over the rounds' ratios, not computed from the median
    figures), and each CPU breakdown the one of the round whose total is the median (so its
    parts add up to its total)."""
    out: dict = {}
    for key, reference, cpu_key in _FIGURES:
        median = statistics.median(one[key] for one in rounds)
        out[key] = round(median) if key.endswith("_iops") else round(median, 1)
        if reference is not None:
            out[_ratio_key(key)] = round(statistics.median(one[_ratio_key(key)] for one in rounds), 3)
            by_total = sorted(rounds, key=lambda one: one[cpu_key]["total"])
            out[cpu_key] = by_total[(len(by_total) - 1) // 2][cpu_key]
    return out


def _verdicts(rounds: list[dict]) -> dict:
    """Each target judged on its per-round values (bench_verdict: met, missed or undecided)."""
    out = {}
    for key, target in TARGETS.items():
        if key.endswith("_total"):  # a CPU breakdown's total
            values = [one[key.removesuffix("_total")]["total"] for one in rounds]
        else:
            values = [one[key] for one in rounds]
        out[key] = verdict(values, target, higher_is_better=key not in LOWER_IS_BETTER)
    return out


def _budget(info) -> dict:  # type: ignore[no-untyped-def]
    """The grant numbers that bound the requests in flight (frontend_stats.max_in_flight
    says how many really were)."""
    segs = info.segments_per_request
    per_request = segs + (indirect_pages_for(segs) if segs > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0)
    return {
        "frontend_max_grants": info.max_grants,
        "frontend_data_pages": info.data_pages,
        "backend_max_persistent_grants_per_ring": DEFAULT_MAX_PERSISTENT_GRANTS,
        "pages_per_largest_request": per_request,
        "largest_requests_in_flight": info.data_pages // per_request,
    }


@click.command("bench")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--size-mib", type=click.IntRange(16, 8192), default=256, show_default=True, help="Image size.")
@click.option("--seconds", type=click.FloatRange(0.2, 600), default=6.0, show_default=True,
              help="Minimum duration of each figure, split over the rounds.")
@click.option("--rounds", type=click.IntRange(1, 20), default=9, show_default=True,
              help="Rounds of every figure, interleaved; the medians are reported, and each target's "
                   "verdict (6 rounds or more can decide one).")
@click.option("--queues", type=click.IntRange(1, 4), default=1, show_default=True)
@click.option("--ring-page-order", type=click.IntRange(0, 4), default=4, show_default=True)
@click.option("--seq-depth", type=click.IntRange(1, 256), default=8, show_default=True,
              help="1 MiB reads in flight.")
@click.option("--rand-depth", type=click.IntRange(1, 512), default=32, show_default=True,
              help="4 KiB reads in flight.")
@click.option("--no-persistent", is_flag=True, help="Grants per request instead of persistent grants.")
def bench(as_json: bool, size_mib: int, seconds: float, rounds: int, queues: int, ring_page_order: int,
          seq_depth: int, rand_depth: int, no_persistent: bool) -> None:
    """Measure blkfront reads against raw pread of the same image (see --json)."""
    size = size_mib * MIB
    config = BlkfrontConfig(
        ring_page_order=ring_page_order, num_queues=queues, max_indirect_segments=256,
        persistent=not no_persistent,
        # Consistent budgets: never more persistent pages than the backend caches per ring,
        # and exactly that many: the grant budget is the backend's cache plus the ring pages,
        # so the pool holds 1056 data pages (4 lanes of 257 for 1 MiB reads, 1028 pages).
        max_persistent_grants=DEFAULT_MAX_PERSISTENT_GRANTS,
        max_grants=DEFAULT_MAX_PERSISTENT_GRANTS + queues * (1 << ring_page_order),
    )
    rng = random.Random(7)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(RAND_OFFSETS)]
    with LocalRig(size, seed=3, shadow=False) as rig:  # no copy of the image in this process
        assert rig.xen is not None and rig.backend is not None
        meter = CpuMeter({"frontend": os.getpid(), "backend": rig.backend.pid, **rig.xen.service_pids})
        dev = rig.attach(config)
        try:
            info = dev.info
            assert info is not None
            per_request = _budget(info)["pages_per_largest_request"]
            # The batch API's lanes are persistent-grant pages of the device's pool: as many
            # 1 MiB lanes as the pool holds (the pool never exceeds the backend's cache).
            seq_lanes = max(1, min(seq_depth, info.data_pages // per_request))
            fd = os.open(rig.image, os.O_RDONLY)
            try:
                raw_seq(fd, size, 0)  # one pass: the image is in the page cache for both sides
                batch_seq(dev, size, seq_lanes, 0)  # and the backend's persistent grants are mapped
                into = bytearray(STREAM_CHUNK * 4096)  # read_many's destination, 16 MiB
                checks = {"checked": 0, "wrong_data": 0}
                per_round = [
                    _one_round(meter, dev, fd, size, offsets, seq_lanes, seq_depth, rand_depth, seconds / rounds,
                               into, checks)
                    for _ in range(rounds)
                ]
                del into
            finally:
                os.close(fd)
            if checks["wrong_data"]:
                raise DemoError("bench.wrong_data", f"{checks['wrong_data']} of {checks['checked']} sampled 4 KiB reads "
                                                    "of read_many differ from pread of the image")
            stats = dict(dev.stats)
        finally:
            dev.close()
        rig.stop_backend()
        events = event_round_trip(rig.xen.root_dir)
    from xentools.tools.bench_memory import memory_figures, memory_summary  # it uses this module's
    memory = memory_figures(min(seconds, 1.0))
    result = {**_combined(per_round), "rounds": per_round, "verdicts": _verdicts(per_round),
        "wrong_data": checks["wrong_data"],
        "checked_reads": checks["checked"],
        "evtchn": events,
        "memory": memory,
        "targets": TARGETS,
        "config": {
            "platform": "software Xen (xentools.platform.sim)",
            "backend": "python -m xentools blkback serve (defaults)",
            # The backend process inherits this environment: the same module, the same choice.
            "backend_ring_loop": "compiled (cffi)" if compiled() is not None else "pure Python",
            "image_mib": size_mib,
            "seconds_per_measurement": seconds,
            "rounds": rounds,
            "figures": f"each the median of {rounds} interleaved rounds of {seconds / rounds:.2f} s per measurement "
                       "(every round: a reference, then the figures divided by it); ratios: the median of the "
                       "rounds' ratios; CPU per request: the round whose total is the median; `rounds`: each "
                       "round's figures",
            "seq_depth": seq_depth,
            "seq_batch_lanes": seq_lanes,
            "rand_depth": rand_depth,
            "api": {
                "batch": "BlkFront.batch_io (blkfront_batch.BatchIO): lanes of persistent grants, "
                         "one push per batch; reads copied once into the caller's buffers (registered, "
                         "one per lane: register_buffers, read_sectors, reap_tags(min_done=depth/4)); on the "
                         "software Xen the reap sleeps in one compiled call (blkfront_ringloop.c xt_front_wait)",
                "rand_read_4k_qd32": f"BatchIO.read_many: {STREAM_CHUNK} offsets per call, into one buffer ({STREAM_CHUNK * 4} KiB), the "
                                     "ring kept full by the compiled stream (blkfront_ringloop.c xt_front_stream) "
                                     f"on the software Xen; {STREAM_SAMPLES} sampled places per call checked against "
                                     "pread (wrong_data)",
                "rand_read_4k_qd32_rounds": "the batch API's rounds: read_sectors, reap_tags(min_done=depth/4)",
                "into_pool": "the same, the data left in the lanes' granted pages (no copy)",
                "futures": "submit_read with a completion callback per read (BlkFuture)",
            },
            "frontend_fill_reap": "compiled (cffi)" if compiled() is not None else "pure Python",
            "protocol": info.protocol,
            "ring_page_order": info.ring_page_order,
            "num_queues": info.num_queues,
            "segments_per_request": info.segments_per_request,
            "persistent": info.persistent,
            "grant_budget": {
                **_budget(info),
                "batch_seq_lanes_pages": seq_lanes * per_request,
                "batch_rand_lanes_pages": rand_depth,
            },
            "mbps_unit": "10^6 bytes per second",
            "cpus": os.cpu_count(),
            "cpu_source": f"/proc/<pid>/stat utime+stime, {_CLK_TCK} ticks per second",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": host.python_version(),
        },
        "frontend_stats": stats,
    }
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    r = result
    click.echo(f"seq read 1 MiB, batch x{seq_lanes}: {r['seq_read_1m_mbps']:.0f} MB/s (into the pool: "
               f"{r['seq_read_1m_into_pool_mbps']:.0f}; futures x{seq_depth}: {r['seq_read_1m_futures_mbps']:.0f}); "
               f"raw pread {r['seq_read_1m_raw_pread_mbps']:.0f} MB/s; ratio {r['seq_read_1m_ratio']:.3f} (into the "
               f"pool {r['seq_read_1m_into_pool_ratio']:.3f}, futures {r['seq_read_1m_futures_ratio']:.3f}; target "
               f"{TARGETS['seq_read_1m_ratio']})")
    click.echo(f"rand read 4 KiB, read_many x{rand_depth}: {r['rand_read_4k_qd32_iops']:.0f} IOPS (batch rounds: "
               f"{r['rand_read_4k_qd32_rounds_iops']:.0f}; futures: {r['rand_read_4k_qd32_futures_iops']:.0f}); raw "
               f"pread loop {r['rand_read_4k_raw_pread_iops']:.0f} IOPS; ratio {r['rand_read_4k_qd32_ratio']:.3f} "
               f"(rounds {r['rand_read_4k_qd32_rounds_ratio']:.3f}, futures {r['rand_read_4k_qd32_futures_ratio']:.3f}; "
               f"target {TARGETS['rand_read_4k_qd32_ratio']}); {r['wrong_data']} of {r['checked_reads']} sampled "
               "reads wrong")
    click.echo(f"medians of {rounds} interleaved rounds; every round's figures are in --json")
    for key, judged in r["verdicts"].items():
        click.echo(verdict_line(key, judged))
    for what, key in (("seq 1 MiB batch", "seq_read_1m_cpu_us_per_request"),
                      ("seq 1 MiB into the pool", "seq_read_1m_into_pool_cpu_us_per_request"),
                      ("seq 1 MiB futures", "seq_read_1m_futures_cpu_us_per_request"),
                      ("rand 4 KiB read_many", "rand_read_4k_cpu_us_per_request"),
                      ("rand 4 KiB batch rounds", "rand_read_4k_rounds_cpu_us_per_request"),
                      ("rand 4 KiB futures", "rand_read_4k_futures_cpu_us_per_request")):
        click.echo(f"CPU per request, {what}: " + ", ".join(f"{k} {v:.1f} us" for k, v in r[key].items()))
    click.echo(memory_summary(memory))
    click.echo(f"event channel round trip: {events['event_round_trip_us']:.1f} us; socketpair "
               f"ping-pong {events['socketpair_round_trip_us']:.1f} us; ratio "
               f"{events['event_round_trip_ratio']:.2f}")
