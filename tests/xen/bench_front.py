"""Our blkfront's two measurements for the real-Xen benches, wherever the frontend runs: in dom0
(bench_blk.py) or in a guest (domu_guest.py's "bench" task, for bench_guest.py).

Owns: what is measured through our BlkFront and how its data is checked (`ours_seq`: 1 MiB
reads at depth 1 into the batch API's granted pages, no copy; `ours_seq_readinto`: the same
through readinto, copied into the caller's buffer; `ours_rand`: 4 KiB reads at depth
RAND_DEPTH through the batch API's read_many), the frontend configuration the benches ask
for (frontend_config), the random reads' depth for every frontend (RAND_DEPTH), and
BenchError.
Must not: import anything of dom0's (it runs in a guest too, whose Python is ~18x slower and
carries only what it imports), or decide a verdict.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

MiB = 1 << 20
SECTOR = 512
RAND_DEPTH = 32
READ_MANY_CHUNK = 256  # ours: 4 KiB reads per read_many call (0.1-0.2 s each in nested dom0)
FRONTEND_CONFIG = {"ring_page_order": 4, "num_queues": 2, "max_indirect_segments": 256, "persistent": True}


def frontend_config(cpus: int) -> dict:
    """FRONTEND_CONFIG for a frontend whose domain has `cpus` vCPUs: no more queues than
    vCPUs, as Linux's xen-blkfront chooses (min(xen_blkif_max_queues, online CPUs)), so our
    frontend and the kernel's in one domain ask for the same."""
    return {**FRONTEND_CONFIG, "num_queues": max(1, min(FRONTEND_CONFIG["num_queues"], cpus))}
# expect(offset, length): the bytes the disk holds there (the image's), to check reads against.
Expect = Callable[[int, int], bytes]


class BenchError(Exception):
    """A measurement could not be made or read wrong data; the message says which."""


def ours_seq(dev: Any, size: int, seconds: float, expect: Expect) -> float:
    """MB/s of 1 MiB reads one after the other (depth 1), wrapping at the end, through the
    batch API with one lane of 1 MiB: each read lands in the lane's granted pages and is
    used there (`view`, no copy: the buffers from the grant pool that the batch API offers
    for this). The first and the last read are checked against expect()."""
    from xentools.devices.blkfront import BlkfrontError

    per = MiB // SECTOR
    io = dev.batch_io(depth=1, request_bytes=MiB)
    try:
        def one(sector: int) -> memoryview:
            [tag] = io.submit_reads([(sector, per)])
            [(tag, status)] = io.reap(1)
            if status:
                raise BenchError(f"the 1 MiB read at sector {sector} failed with status {status}")
            return io.view(tag)

        return _sequential(one, size, seconds, expect)
    except BlkfrontError as err:
        raise BenchError(f"sequential reads through the batch API: {err}") from err
    finally:
        io.close()


def ours_seq_readinto(dev: Any, size: int, seconds: float, expect: Expect) -> float:
    """As ours_seq, through readinto: each 1 MiB copied from the granted pages into the
    caller's buffer, as pread(2) gives it (reported beside ours_seq, with no target)."""
    buf = bytearray(MiB)

    def one(sector: int) -> bytearray:
        dev.readinto(sector, buf)
        return buf

    return _sequential(one, size, seconds, expect)


def _sequential(read: Callable[[int], Any], size: int, seconds: float, expect: Expect) -> float:
    """MB/s of read(sector) calls of 1 MiB each at consecutive MiBs, wrapping at the end,
    until `seconds` passed; the bytes of the first and the last call (what read returned)
    checked against expect()."""
    per = MiB // SECTOR
    end = size // SECTOR
    if read(0) != expect(0, MiB):
        raise BenchError("the first MiB read through our frontend differs from the image")
    done = sector = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        data = read(sector)
        done += MiB
        now = time.perf_counter()
        if now >= deadline:
            if data != expect(sector * SECTOR, MiB):
                raise BenchError(f"the MiB at {sector * SECTOR} read through our frontend differs from the image")
            return done / (now - started) / 1e6
        sector = (sector + per) % end


def ours_rand(dev: Any, size: int, seconds: float, expect: Expect) -> float:
    """IOPS of 4 KiB reads at random 4 KiB-aligned offsets through the batch API's read_many
    (RAND_DEPTH lanes in flight on queue 0, READ_MANY_CHUNK reads per call into one buffer)
    until the time is up; the first and last read of every call are checked against expect()."""
    from xentools.devices.blkfront import BlkfrontError

    rng = random.Random(11)
    pages = size // 4096
    offsets = [rng.randrange(pages) * 8 for _ in range(8192)]  # in sectors
    into = bytearray(READ_MANY_CHUNK * 4096)
    io = dev.batch_io(depth=RAND_DEPTH, request_bytes=4096)
    try:
        done = 0
        started = time.perf_counter()
        deadline = started + seconds
        while True:
            chunk = [offsets[(done + k) % len(offsets)] for k in range(READ_MANY_CHUNK)]
            io.read_many(chunk, into)
            done += READ_MANY_CHUNK
            now = time.perf_counter()
            for k in (0, READ_MANY_CHUNK - 1):
                if into[k * 4096 : (k + 1) * 4096] != expect(chunk[k] * SECTOR, 4096):
                    raise BenchError(f"the 4 KiB at {chunk[k] * SECTOR} read by read_many differ from the image")
            if now >= deadline:
                return done / (now - started)
    except BlkfrontError as err:
        raise BenchError(f"random reads through read_many: {err}") from err
    finally:
        io.close()
