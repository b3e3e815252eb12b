"""The hostile frontend (tests/hostile_frontend.py, in its own process) against blkback (in
its own process) over the software Xen: thousands of malformed messages, ring index games,
event storms and bogus handshake keys. The backend must answer every bad request with ERROR
or EOPNOTSUPP, never crash or hang, and never write a byte: the image, its size and a
sentinel file next to it stay exactly as they were."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time

import pytest

from hostile_frontend import BackendProcess
from xentools.devices.toolstack import create_vbd
from xentools.platform.sim.grantd import query_state

HOSTILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile_frontend.py")
RANDOM_SEED = random.SystemRandom().randrange(2**32)


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize(
    "seed,backend_args",
    [
        (20240601, []),
        (RANDOM_SEED, ["--max-indirect-segments", "4096", "--max-queues", "2", "--no-persistent"]),
    ],
    ids=["fixed-seed", "random-seed"],
)
def test_hostile_frontend(fresh_xen, seed, backend_args) -> None:
    image = os.path.join(fresh_xen.root_dir, "disk.img")
    sentinel = os.path.join(fresh_xen.root_dir, "disk.img.sentinel")
    rng = random.Random(seed)
    with open(image, "wb") as f:
        f.write(rng.randbytes(4 << 20))
    with open(sentinel, "wb") as f:
        f.write(rng.randbytes(64 << 10))
    before = (digest(image), os.path.getsize(image), digest(sentinel), os.path.getsize(sentinel))
    xs = fresh_xen.platform(0).open_xenstore()
    paths = create_vbd(xs, backend_domid=0, frontend_domid=1, devid=51712, params=image)
    backend = BackendProcess(fresh_xen.root_dir, paths.backend, image, *backend_args)
    try:
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, HOSTILE, "--sim-dir", fresh_xen.root_dir, "--backend-path", paths.backend,
             "--frontend-path", paths.frontend, "--frontend-id", "1", "--seed", str(seed),
             "--messages", "10000", "--time-limit", "25"],
            capture_output=True, text=True, timeout=50,
        )
        elapsed = time.monotonic() - start
        assert result.returncode == 0, f"seed {seed}:\n{result.stderr[-4000:]}\nbackend:\n{backend.stderr()[-2000:]}"
        counts = json.loads(result.stdout)["counts"]
        malformed = sum(n for kind, n in counts.items() if kind not in ("clean_read", "cycles", "event_storm", "rewritten_after_publish"))
        assert malformed >= 1000, f"seed {seed}: only {malformed} malformed messages in {elapsed:.1f} s"
        assert any(kind.startswith("handshake_") for kind in counts), counts
        assert any(kind.startswith("ring_") for kind in counts), counts
        assert backend.alive(), f"seed {seed}: the backend died:\n{backend.stderr()[-3000:]}"
        assert backend.stop() == 0, f"seed {seed}: {backend.stderr()[-3000:]}"
        assert "Traceback" not in backend.stderr(), f"seed {seed}: {backend.stderr()[-3000:]}"
        state = query_state(fresh_xen.grantd_path)
        assert not [m for m in state["maps"] if m["domid"] == 0], f"seed {seed}: grants left mapped"
        assert not [p for p in state["ports"] if p["domid"] == 0], f"seed {seed}: ports left bound"
        report = backend.read_report()["frontends"][paths.frontend]["violations"]
        for rule in ("request.op", "segment.last_sect", "request.beyond_disk", "indirect.op"):
            assert report.get(rule, 0) > 0, (seed, report)
        assert sum(report.values()) >= malformed * 0.9, (seed, report, counts)
    finally:
        if backend.alive():
            backend.stop()
        xs.close()
    after = (digest(image), os.path.getsize(image), digest(sentinel), os.path.getsize(sentinel))
    assert after == before, f"seed {seed}: bytes changed on disk"
