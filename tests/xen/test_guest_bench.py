"""The guest benchmark (tests/xen/bench_guest.py), once, short, inside the real-Xen suite.

Owns: running bench_guest.run() with one-second measurements and one round (in a PV guest, its
own xen-blkfront reading disks on xen-blkback, on our blkback and on qdisk, and our blkfront
reading one on xen-blkback), printing its JSON
line and ratios (NOT asserted against their targets: one round under nested TCG decides
nothing), and asserting what a benchmark must get right: every figure was measured
(positive), each kernel disk's first MiB read in the guest matched the image, and so did our
frontend's reads (bench_guest and the guest check them and fail otherwise), our blkback saw no violation by the guest's frontend and exited
cleanly, its compiled ring loop served the guest's requests (the first ones, on grants not yet
in its persistent cache, are the Python path's), and every target has a verdict,
"undecided" after one round. `make bench-xen-guest` runs the longer version, with the guest
on a CPU of its own.
"""

from __future__ import annotations

import json

import bench_guest
from bench_blk import keep_result, ratios_line
from blk_helpers import no_vbd_left  # noqa: F401 - fixture
import pytest


@pytest.mark.usefixtures("no_vbd_left")
def test_guest_benchmark_runs_and_prints_its_ratios(tmp_path, capsys):
    result = bench_guest.run(seconds=1.0, rounds=1, size_mib=32, workdir=tmp_path)
    line = json.dumps(result, sort_keys=True)
    keep_result(line, "bench-guest.json")
    ratios = result["ratios"]
    with capsys.disabled():
        print(f"\nbench-guest: {line}")
        print(f"bench-guest ratios (target, not asserted): {ratios_line(ratios, bench_guest.TARGETS)}")
    for setup in bench_guest.SETUPS:
        assert result[setup]["seq_1m_mbps"] > 0 and result[setup]["rand_4k_qd32_iops"] > 0, (setup, result[setup])
    assert result["ours_front"]["seq_1m_readinto_mbps"] > 0, result["ours_front"]
    assert "ours_front_vs_kernel_front_seq_1m_readinto" in ratios
    assert all(value > 0 for value in ratios.values()), ratios
    assert result["our_blkback_violations"] == 0
    served = result["our_blkback_requests"]
    assert 0 < served["by_compiled_loop"] <= served["served"], served
    verdicts = result["verdicts"]
    assert set(verdicts) == set(bench_guest.TARGETS)
    assert all(judged["verdict"] == "undecided" and judged["rounds"] == 1 for judged in verdicts.values()), verdicts
