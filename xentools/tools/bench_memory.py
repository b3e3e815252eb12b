"""`xentools bench`'s memory figures: blkback's resident memory after the same workload over
images of different sizes, and the bench process's own.

Owns: `rss_mib` (a process's resident memory from /proc/<pid>/status: all of it, its peak,
and the anonymous, file-backed and shared-memory parts) and `memory_figures`: for each
(image size, queues) a software-Xen rig (demo.LocalRig without a shadow copy) whose blkback
runs in its own process; our blkfront reads the whole image once in 1 MiB reads and then
4 KiB random reads over all of it for a while (futures API: requests go round robin over
every queue);
blkback's memory is read before and after, the bench process's at the end. blkback's
resident memory counts the frontend's granted pages it has mapped, its own heap and, where it
reads from mapped windows (`blkback serve --reads`; `auto` measures: blkback_ringloop.
choose_reads), the image's page cache it has mapped to copy reads from (its window pool:
blkback_ringloop.MAP_WINDOWS windows of MAP_WINDOW bytes for the whole process): flat in the
image's size is the target (issue 11). Each run says how blkback read (for `auto`, what
choose_reads measures here, in the bench process, on the same image: blkback measures the
same way). `memory_summary` says it in one line.
Must not: assert anything (it measures and reports), or keep a copy of an image.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from xentools.devices.blkback_ringloop import MAP_WINDOW, MAP_WINDOWS, choose_reads, compiled
from xentools.devices.blkback_grants import DEFAULT_MAX_PERSISTENT_GRANTS
from xentools.devices.blkfront import BlkfrontConfig
from xentools.tools.bench import blk_rand, blk_seq
from xentools.tools.demo import MIB, LocalRig

# (image MiB, queues, blkback --map-budget-mib or None for its default, blkback --reads): the
# same workload over a small and a large image, the large one again over four queues, each
# read as blkback's `auto` chooses, and the large one over four queues from mapped windows
# (the budget is one for the whole process).
MEMORY_RUNS: tuple[tuple[int, int, int | None, str], ...] = (
    (64, 1, None, "auto"), (1024, 1, None, "auto"), (1024, 4, None, "auto"), (1024, 4, None, "windows"))


def rss_mib(pid: int | str = "self") -> dict[str, float]:
    """Resident memory of process `pid` in MiB (proc(5) /proc/<pid>/status): VmRSS, its
    peak VmHWM, and of it RssAnon (heap, stacks), RssFile (mapped files: libraries, and
    an image on a disk file system) and RssShmem (shared memory: an image on tmpfs, the
    software Xen's granted pages)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)

    def mib(key: str) -> float:
        return round(int(fields.get(key, "0 kB").split()[0]) / 1024, 1)

    return {"rss": mib("VmRSS"), "peak": mib("VmHWM"), "anon": mib("RssAnon"), "file": mib("RssFile"),
            "shmem": mib("RssShmem")}


def _one(size_mib: int, queues: int, budget_mib: int | None, reads: str, seconds: float) -> dict:
    """The workload over one image of `size_mib` MiB with `queues` queues, read `reads`."""
    size = size_mib * MIB
    config = BlkfrontConfig(ring_page_order=4, num_queues=queues, max_indirect_segments=256, persistent=True,
                            max_persistent_grants=DEFAULT_MAX_PERSISTENT_GRANTS)
    rng = random.Random(13)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(20000)]
    backend_args = ("--map-budget-mib", str(budget_mib)) if budget_mib is not None else ()
    backend_args += ("--reads", reads) if reads != "auto" else ()
    with LocalRig(size, seed=5, shadow=False, backend_args=backend_args) as rig:
        assert rig.backend is not None
        module = compiled()
        if module is None:
            how: dict = {"reads": "preadv", "how": "pure-Python path"}
        elif reads != "auto":
            how = {"reads": reads, "how": "set"}
        else:
            fd = os.open(rig.image, os.O_RDONLY)
            try:
                how = choose_reads(module, fd, size)
            finally:
                os.close(fd)
        dev = rig.attach(config)
        try:
            before = rss_mib(rig.backend.pid)
            seq = blk_seq(dev, size, 8, 0)  # one pass over the whole image
            rand = blk_rand(dev, offsets, 32, seconds)
            after = rss_mib(rig.backend.pid)
        finally:
            dev.close()
        rig.stop_backend()
    return {"image_mib": size_mib, "queues": queues, "reads": how,
            "map_budget_mib": budget_mib if budget_mib is not None else MAP_WINDOWS * MAP_WINDOW >> 20,
            "seq_pass_mbps": round(seq, 1), "rand_4k_iops": round(rand),
            "blkback_rss_mib_before": before, "blkback_rss_mib_after": after}


def memory_figures(seconds: float, plan: tuple[tuple[int, int, int | None, str], ...] = MEMORY_RUNS) -> dict:
    """blkback's memory after the same workload over each (image MiB, queues, budget MiB,
    reads) of `plan` (the first two: the small and the large image), and this process's."""
    runs = [_one(size_mib, queues, budget, reads, seconds) for size_mib, queues, budget, reads in plan]
    first, largest = runs[0]["blkback_rss_mib_after"], runs[1]["blkback_rss_mib_after"]
    return {
        "runs": runs,
        # blkback's RSS after the large image's workload over the small one's (1.0: flat).
        "blkback_rss_large_over_small": round(largest["rss"] / first["rss"], 3) if first["rss"] else 0.0,
        "bench_process_rss_mib": rss_mib(),
        "config": {
            "workload": "one pass of 1 MiB reads over the whole image at depth 8, then 4 KiB random reads "
                        f"at depth 32 for {seconds} s (futures API: round robin over the queues)",
            "images": "on the bench's temporary directory's file system, written without holes",
            "window_pool": f"where reads is windows: map_budget_mib of the image's page cache mapped at once, "
                           f"in windows of {MAP_WINDOW >> 20} MiB, for the whole blkback process"
                           if compiled() is not None else "none (pure-Python path: preadv)",
        },
    }


def memory_summary(memory: dict) -> str:
    """memory_figures' result in one line of text."""
    runs = "; ".join(
        f"{r['image_mib']} MiB image x{r['queues']} queues, reads {r['reads']['reads']}"
        f"{', budget ' + str(r['map_budget_mib']) + ' MiB' if r['reads']['reads'] == 'windows' else ''}: "
        f"{r['blkback_rss_mib_after']['rss']} "
        f"({r['blkback_rss_mib_after']['anon']}/{r['blkback_rss_mib_after']['file']}/"
        f"{r['blkback_rss_mib_after']['shmem']})" for r in memory["runs"])
    own = memory["bench_process_rss_mib"]
    return (f"blkback RSS after the workload, MiB (anon/file/shmem): {runs}; the bench process {own['rss']} "
            f"(peak {own['peak']})")
