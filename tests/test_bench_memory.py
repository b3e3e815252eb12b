"""The bench's memory figures (xentools/tools/bench_memory.py): blkback's resident memory,
split as /proc reports it, after the same workload over a small and a larger image.

Owns: proof that rss_mib reads a process's resident memory and its parts (anonymous memory
grows when this process touches a buffer), and that memory_figures runs the workload on a
blkback in its own process and reports its memory before and after: with the compiled
loop reading from mapped windows (`blkback serve --reads windows`), what the larger image's
workload added to blkback's mapped files is bounded by the window pool's budget
(`blkback serve --map-budget-mib`, for the whole process), not by the image's size, and
nothing with preadv (`--reads preadv`). Nothing is timed.
"""

from __future__ import annotations

from xentools.devices.blkback_ringloop import compiled
from xentools.tools.bench_memory import memory_figures, memory_summary, rss_mib

MIB = 1 << 20


def test_rss_mib_sees_anonymous_memory_grow():
    before = rss_mib()
    buffer = bytearray(48 * MIB)
    for offset in range(0, len(buffer), 4096):
        buffer[offset] = 1
    after = rss_mib()
    assert after["anon"] - before["anon"] >= 40 and after["rss"] >= after["anon"]
    assert set(after) == {"rss", "peak", "anon", "file", "shmem"} and after["peak"] >= after["rss"]
    del buffer


def test_blkback_memory_is_bounded_by_the_window_pool_not_the_image():
    """A 16 MiB and a 96 MiB image (over two queues), each read whole by a blkback reading from
    mapped windows with a 16 MiB budget: its mapped file pages grow by at most the budget (plus a
    little slack for pages of its libraries), though the larger image is six times the budget.
    The 96 MiB image read with preadv (blkback serve --reads preadv) maps none of it."""
    memory = memory_figures(0.2, plan=((16, 1, 16, "windows"), (96, 2, 16, "windows"), (96, 1, None, "preadv")))
    small, large, direct = memory["runs"]
    assert (small["image_mib"], small["queues"], large["image_mib"], large["queues"]) == (16, 1, 96, 2)
    if compiled() is not None:
        assert [run["reads"] for run in memory["runs"]] == [{"reads": "windows", "how": "set"}] * 2 + [
            {"reads": "preadv", "how": "set"}]
    else:  # XENTOOLS_RINGLOOP=python: blkback's pure-Python path reads with preadv
        assert all(run["reads"] == {"reads": "preadv", "how": "pure-Python path"} for run in memory["runs"])
    pool_mib = 16
    for run in memory["runs"]:
        assert run["seq_pass_mbps"] > 0 and run["rand_4k_iops"] > 0
        grown = run["blkback_rss_mib_after"]["file"] - run["blkback_rss_mib_before"]["file"]
        assert grown <= (pool_mib if run["reads"]["reads"] == "windows" else 0) + 4, (run, pool_mib)
    assert large["blkback_rss_mib_after"]["rss"] < small["blkback_rss_mib_after"]["rss"] + 16, memory
    assert memory["bench_process_rss_mib"]["rss"] > 0
    summary = memory_summary(memory)
    if compiled() is not None:
        assert "96 MiB image x2 queues, reads windows, budget 16 MiB" in summary, summary
    assert "96 MiB image x1 queues, reads preadv: " in summary, summary
