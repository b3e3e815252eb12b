"""`xentools bench`: blkfront throughput against raw pread of the same image, same run.

Owns: the `bench` command and its measurements: sequential 1 MiB reads (MB/s, divided by a
plain os.pread loop over the same image file) and random 4 KiB reads at queue depth 32
(IOPS, divided by a plain Python os.pread loop over the same offsets). The image is read
once first, so both sides read from the page cache. With `--json`, one JSON object on stdout
with the figures, the ratios and the configuration used.
Must not: be a test: nothing here asserts a target; it measures and reports.
"""

from __future__ import annotations

import json
import os
import platform as host
import random
import threading
import time
from collections.abc import Callable

import click

from xentools.core.blkif import BLKIF_MAX_SEGMENTS_PER_REQUEST, indirect_pages_for
from xentools.devices.blkback_grants import DEFAULT_MAX_PERSISTENT_GRANTS
from xentools.devices.blkfront import BlkFront, BlkfrontConfig, BlkFuture
from xentools.tools.demo import MIB, DemoError, LocalRig

TARGETS = {"seq_read_1m_ratio": 0.7, "rand_read_4k_qd32_ratio": 0.5}


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
    requests = [(offset // 512, MIB // 512) for offset in range(0, size, MIB)]
    nbytes, seconds = _timed(duration, lambda: (_chained(dev, requests, depth, 120), size)[1])
    return nbytes / seconds / 1e6


def blk_rand(dev: BlkFront, offsets: list[int], depth: int, duration: float) -> float:
    requests = [(offset // 512, 8) for offset in offsets]
    ops, seconds = _timed(duration, lambda: (_chained(dev, requests, depth, 120), len(requests))[1])
    return ops / seconds


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
@click.option("--seconds", type=click.FloatRange(0.2, 600), default=2.0, show_default=True,
              help="Minimum duration of each measurement.")
@click.option("--queues", type=click.IntRange(1, 4), default=1, show_default=True)
@click.option("--ring-page-order", type=click.IntRange(0, 4), default=4, show_default=True)
@click.option("--seq-depth", type=click.IntRange(1, 256), default=8, show_default=True,
              help="1 MiB reads in flight.")
@click.option("--rand-depth", type=click.IntRange(1, 512), default=32, show_default=True,
              help="4 KiB reads in flight.")
@click.option("--no-persistent", is_flag=True, help="Grants per request instead of persistent grants.")
def bench(as_json: bool, size_mib: int, seconds: float, queues: int, ring_page_order: int,
          seq_depth: int, rand_depth: int, no_persistent: bool) -> None:
    """Measure blkfront reads against raw pread of the same image (see --json)."""
    size = size_mib * MIB
    config = BlkfrontConfig(
        ring_page_order=ring_page_order, num_queues=queues, max_indirect_segments=256,
        persistent=not no_persistent,
        # Consistent budgets: never more persistent pages than the backend caches per ring.
        max_persistent_grants=DEFAULT_MAX_PERSISTENT_GRANTS,
    )
    rng = random.Random(7)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(20000)]
    with LocalRig(size, seed=3) as rig:
        dev = rig.attach(config)
        try:
            info = dev.info
            assert info is not None
            fd = os.open(rig.image, os.O_RDONLY)
            try:
                raw_seq(fd, size, 0)  # one pass: the image is in the page cache for both sides
                blk_seq(dev, size, seq_depth, 0)  # and the backend's persistent grants are mapped
                seq_raw = raw_seq(fd, size, seconds)
                seq_blk = blk_seq(dev, size, seq_depth, seconds)
                rand_raw = raw_rand(fd, offsets, seconds)
                rand_blk = blk_rand(dev, offsets, rand_depth, seconds)
            finally:
                os.close(fd)
            stats = dict(dev.stats)
        finally:
            dev.close()
        rig.stop_backend()
    result = {
        "seq_read_1m_mbps": round(seq_blk, 1),
        "seq_read_1m_raw_pread_mbps": round(seq_raw, 1),
        "seq_read_1m_ratio": round(seq_blk / seq_raw, 3),
        "rand_read_4k_qd32_iops": round(rand_blk),
        "rand_read_4k_raw_pread_iops": round(rand_raw),
        "rand_read_4k_qd32_ratio": round(rand_blk / rand_raw, 3),
        "targets": TARGETS,
        "config": {
            "platform": "software Xen (xentools.platform.sim)",
            "backend": "python -m xentools.devices.blkback (defaults)",
            "image_mib": size_mib,
            "seconds_per_measurement": seconds,
            "seq_depth": seq_depth,
            "rand_depth": rand_depth,
            "protocol": info.protocol,
            "ring_page_order": info.ring_page_order,
            "num_queues": info.num_queues,
            "segments_per_request": info.segments_per_request,
            "persistent": info.persistent,
            "grant_budget": _budget(info),
            "mbps_unit": "10^6 bytes per second",
            "cpus": os.cpu_count(),
            "python": host.python_version(),
        },
        "frontend_stats": stats,
    }
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    click.echo(f"seq read 1 MiB x{seq_depth}: {seq_blk:.0f} MB/s; raw pread {seq_raw:.0f} MB/s; "
               f"ratio {seq_blk / seq_raw:.3f} (target {TARGETS['seq_read_1m_ratio']})")
    click.echo(f"rand read 4 KiB x{rand_depth}: {rand_blk:.0f} IOPS; raw pread loop {rand_raw:.0f} IOPS; "
               f"ratio {rand_blk / rand_raw:.3f} (target {TARGETS['rand_read_4k_qd32_ratio']})")
