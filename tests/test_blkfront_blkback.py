"""End to end: blkfront (this process) against blkback (`python -m xentools blkback serve`,
its own process) over one software Xen, with RAW image files.

- The default configuration moves a 64 MiB random workload (reads verified as they complete,
  then the whole disk read back and compared with the image file itself).
- Every value of every dimension passes a smaller verified workload: ring order 0-4, 1-4
  queues, indirect off / 11 / 256 / 4096 segments, persistent grants on/off, both ABIs.
- A pairwise covering of those dimensions (computed here, greedily) passes too.
- blkback's conformance report counts no rule our frontend broke.
One blkback process per advertised indirect maximum serves its own vbd; the frontend attaches,
works, closes, and the next session reconnects to the same backend.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys

import pytest

from xentools.devices.blkfront import BlkFront, BlkfrontConfig
from xentools.devices.toolstack import create_vbd
from xentools.tools.demo import mixed_workload

MIB = 1 << 20
DIMENSIONS = {
    "ring_page_order": [0, 1, 2, 3, 4],
    "num_queues": [1, 2, 3, 4],
    "indirect": [0, 11, 256, 4096],
    "persistent": [True, False],
    "protocol": ["x86_64-abi", "x86_32-abi"],
}
DEFAULTS = {"ring_page_order": 2, "num_queues": 2, "indirect": 256, "persistent": True, "protocol": "x86_64-abi"}
SMALL_DISK = 24 * MIB
DEFAULT_DISK = 64 * MIB


def pairwise(dimensions: dict[str, list]) -> list[dict]:
    """A small set of combinations covering every pair of values of every two dimensions
    (greedy: each row takes the candidate covering most pairs still uncovered)."""
    names = list(dimensions)
    uncovered = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2)
        for va in dimensions[a]
        for vb in dimensions[b]
    }
    candidates = [dict(zip(names, values)) for values in itertools.product(*dimensions.values())]
    rows = []
    while uncovered:
        def gain(row: dict) -> int:
            return sum(((a, row[a]), (b, row[b])) in uncovered for a, b in itertools.combinations(names, 2))

        best = max(candidates, key=gain)
        rows.append(best)
        uncovered -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
    return rows


class Backend:
    """One blkback process serving one vbd backed by a random RAW image."""

    def __init__(self, xen, xs0, devid: int, size: int, indirect: int) -> None:
        self.image = os.path.join(xen.root_dir, f"disk{devid}.img")
        rng = random.Random(devid)
        with open(self.image, "wb") as f:
            for _ in range(size // MIB):
                f.write(rng.randbytes(MIB))
        self.devid = devid
        self.size = size
        paths = create_vbd(xs0, backend_domid=0, frontend_domid=1, devid=devid, params=self.image)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xentools", "blkback", "serve", "--sim-dir", xen.root_dir,
             "--backend-path", paths.backend, "--image", self.image,
             "--max-indirect-segments", str(indirect)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def contents(self) -> bytes:
        with open(self.image, "rb") as f:
            return f.read()

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, err.decode(errors="replace")
        return json.loads(out) if out.strip() else {}


@pytest.fixture(scope="module")
def backends(xen):
    """A backend per advertised indirect maximum, each with its own small disk."""
    xs0 = xen.platform(0).open_xenstore()
    made = {
        indirect: Backend(xen, xs0, 51712 + 16 * index, SMALL_DISK, indirect)
        for index, indirect in enumerate(DIMENSIONS["indirect"])
    }
    yield made
    reports = {indirect: backend.stop() for indirect, backend in made.items()}
    xs0.close()
    for indirect, report in reports.items():
        assert report.get("total", 0) == 0, f"blkback (indirect {indirect}) saw violations: {report}"


def _config(combo: dict) -> BlkfrontConfig:
    grants = 1024
    if combo["indirect"] > 1024:
        grants = 2 * (combo["indirect"] + 8) + 64 + 16  # two 16 MiB requests fit
    return BlkfrontConfig(
        ring_page_order=combo["ring_page_order"],
        num_queues=combo["num_queues"],
        max_indirect_segments=combo["indirect"],
        persistent=combo["persistent"],
        protocol=combo["protocol"],
        max_grants=grants,
    )


def verified_workload(dev: BlkFront, shadow: bytearray, rng: random.Random, total: int, max_bytes: int) -> None:
    """Random reads and writes, `total` bytes in all, up to 16 in flight with no two in
    flight overlapping; every read is compared with `shadow` (kept up to date)."""
    most = max_bytes // dev.sector_size
    mixed_workload(dev, shadow, rng, total, depth=16,
                   choose=lambda r: r.choice([1, 7, 8, 64, 88, 256, 1000, most, r.randrange(1, most + 1)]))


def _session(xen, backend: Backend, combo: dict, total: int, *, max_bytes: int | None = None) -> None:
    shadow = bytearray(backend.contents())
    config = _config(combo)
    with BlkFront.attach(xen.platform(1), backend.devid, config=config) as dev:
        info = dev.info
        assert info.protocol == combo["protocol"] and info.persistent is combo["persistent"]
        assert info.ring_page_order == combo["ring_page_order"] and info.num_queues == combo["num_queues"]
        negotiated = combo["indirect"] if combo["indirect"] > 11 else 0
        assert info.max_indirect_segments == negotiated
        rng = random.Random(repr(sorted(combo.items())))
        verified_workload(dev, shadow, rng, total, max_bytes or info.segments_per_request * 4096 * 2)
        dev.flush()
        # Discard, then write the range again: discarded content is unspecified by blkif.
        start = rng.randrange(len(shadow) // 512 - 2048)
        dev.discard(start, 2048)
        data = rng.randbytes(2048 * 512)
        dev.write(start, data)
        shadow[start * 512 : (start + 2048) * 512] = data
        dev.flush()
        assert dev.read(0, len(shadow) // 512) == shadow
        assert dev.failed is None and dev.stats["errors"] == 0
        if negotiated:
            assert dev.stats["indirect_requests"] > 0
    assert dev.close_report == {"backend_closed": True, "leaked_pages": 0, "still_mapped": 0}
    assert backend.contents() == shadow  # the data landed in the image, where it belongs


@pytest.mark.parametrize(
    ("dimension", "value"),
    [(name, value) for name, values in DIMENSIONS.items() for value in values],
)
def test_every_value_of_every_dimension(xen, backends, dimension, value):
    combo = {**DEFAULTS, dimension: value}
    _session(xen, backends[combo["indirect"]], combo, 6 * MIB)


def test_pairwise_combinations(xen, backends):
    rows = pairwise(DIMENSIONS)
    assert len(rows) <= 30  # 5 x 4 pairs at the very least
    for combo in rows:
        _session(xen, backends[combo["indirect"]], combo, 3 * MIB)


def test_pairwise_covers_every_pair():
    rows = pairwise(DIMENSIONS)
    for a, b in itertools.combinations(DIMENSIONS, 2):
        assert {(row[a], row[b]) for row in rows} == set(itertools.product(DIMENSIONS[a], DIMENSIONS[b]))


def test_default_configuration_64mib_random_workload(xen):
    xs0 = xen.platform(0).open_xenstore()
    backend = Backend(xen, xs0, 51792, DEFAULT_DISK, 256)  # xvdf; blkback's defaults
    try:
        shadow = bytearray(backend.contents())
        with BlkFront.attach(xen.platform(1), "xvdf") as dev:  # BlkfrontConfig() defaults
            assert dev.info.sectors * 512 == DEFAULT_DISK
            verified_workload(dev, shadow, random.Random(64), DEFAULT_DISK, 2 * MIB)
            dev.flush()
            assert dev.read(0, DEFAULT_DISK // 512) == shadow
            assert dev.failed is None
        assert backend.contents() == shadow
    finally:
        report = backend.stop()
        xs0.close()
    assert report.get("total", 0) == 0, report
