"""The block benchmark (tests/xen/bench_blk.py), once, short, inside the real-Xen suite.

Owns: running bench_blk.run() with one-second measurements, one round (the four setups
attached at once, each measured once) and printing its JSON line (kernel
blkback, QEMU's qdisk and our blkback side by side for the kernel blkfront) and its
ratios (they are noisy under nested TCG and are NOT asserted against their targets), and
asserting what a benchmark must get right: every figure was measured (positive), the data
read through each frontend matched the image (bench_blk checks it and raises otherwise),
our frontend released its grants (checked inside), our blkback saw no violation by the
Linux frontend, and every target has a verdict, "undecided" after one round. The line also
says how many of that frontend's requests our blkback's compiled ring loop served (reported,
not asserted). `make bench-xen` runs the longer version on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import bench_blk
import pytest
from blk_helpers import no_vbd_left  # noqa: F401 - fixture


@pytest.mark.usefixtures("no_vbd_left")
def test_benchmark_runs_and_prints_its_ratios(tmp_path, capsys):
    blkfront_before = Path("/sys/module/xen_blkfront").exists()
    result = bench_blk.run(seconds=1.0, size_mib=32, workdir=tmp_path)
    line = json.dumps(result, sort_keys=True)
    bench_blk.keep_result(line, "bench-blk.json")
    ratios = result["ratios"]
    with capsys.disabled():
        print(f"\nbench-blk: {line}")
        print(f"bench-blk ratios (target, not asserted): {bench_blk.ratios_line(ratios, bench_blk.TARGETS)}")
    for setup in ("kernel_front_on_kernel_back", "ours_front_on_kernel_back", "kernel_front_on_ours_back",
                  "kernel_front_on_qdisk"):
        assert result[setup]["seq_1m_mbps"] > 0 and result[setup]["rand_4k_qd32_iops"] > 0, (setup, result[setup])
    assert result["ours_front_on_kernel_back"]["seq_1m_readinto_mbps"] > 0, result["ours_front_on_kernel_back"]
    assert "ours_vs_kernel_front_seq_1m_readinto" in ratios
    assert all(value > 0 for value in ratios.values()), ratios
    assert result["our_blkback_violations"] == 0
    # Every target is judged, and one round decides none of them (its interval covers nothing).
    verdicts = result["verdicts"]
    assert set(verdicts) == set(bench_blk.TARGETS)
    assert all(judged["verdict"] == "undecided" and judged["rounds"] == 1 for judged in verdicts.values()), verdicts
    # The benchmark loads dom0's xen-blkfront for its kernel-frontend runs and unloads it.
    assert Path("/sys/module/xen_blkfront").exists() == blkfront_before
