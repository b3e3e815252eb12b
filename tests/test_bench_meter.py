"""The bench's own instruments: CPU time per process from /proc, and the event round trip.

Owns: proof that cpu_seconds() reads a process's CPU time (it grows while the process
works, not while it sleeps), that CpuMeter divides by the requests and adds a total, and
that event_round_trip() really bounces events between two processes of a software Xen and
reports them against a socketpair ping-pong of the same run. No figure is asserted against
a target: the bench reports, tests never time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from xentools.platform.sim.grantd import query_state
from xentools.tools.bench import CpuMeter, cpu_seconds, event_round_trip


def test_cpu_seconds_counts_work_not_sleep():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)  # both are past their start-up
        meter = CpuMeter({"busy": busy.pid, "idle": idle.pid})
        meter.start()
        time.sleep(1.0)
        used = meter.per_request_us(1)  # microseconds over the second, per "request"
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
    assert used["busy"] > used["idle"]
    assert used["busy"] >= 10_000  # at least one clock tick of CPU in a second of looping
    assert abs(used["total"] - (used["busy"] + used["idle"])) < 0.05


def test_cpu_meter_per_request_and_total():
    meter = CpuMeter({"me": os.getpid()})
    meter.start()
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    out = meter.per_request_us(1000)
    assert set(out) == {"me", "total"}
    assert out["me"] >= 100 and out["total"] == out["me"]  # >= 0.1 s over 1000 requests


def test_event_round_trip_between_two_processes(fresh_xen):
    result = event_round_trip(fresh_xen.root_dir, count=200)
    # Every port the two processes bound is gone again.
    assert query_state(fresh_xen.grantd_path)["ports"] == []
    assert result["round_trips"] == 200
    assert result["event_round_trip_us"] > 0 and result["socketpair_round_trip_us"] > 0
    ratio = result["event_round_trip_us"] / result["socketpair_round_trip_us"]
    assert abs(result["event_round_trip_ratio"] - ratio) < 0.01
