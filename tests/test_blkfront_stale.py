"""blkfront never grants a page that holds older data (XSA-403), against a lying backend.

The backend (tests/hostile_backend.py, its own process) answers every READ with OKAY without
writing a byte, and looks at everything the frontend's granted pages hold besides the
request's own data. Ten sessions, with and without persistent grants, each writing data of
its own first (so that the pool's pages have held it), then reading through the lie: every
such read must come back as zeros, never as bytes of an earlier request, and the backend must
never have found a non-zero byte outside a request's data.
"""

from __future__ import annotations

import random

import pytest

from hostile_backend import known_data, make_vbd, remove_vbd

from xentools.devices.blkfront import BlkFront, BlkfrontConfig

SECTORS = 4096
CASES = [(persistent, case) for persistent in (True, False) for case in range(5)]


@pytest.mark.parametrize("persistent,case", CASES, ids=[f"{'persistent' if p else 'per-request'}-{c}" for p, c in CASES])
def test_lying_backend_reads_zeros_not_older_data(xen, backend, xs0, persistent, case):
    rng = random.Random(9403 + case * 2 + persistent)
    devid = 700 + case * 2 + persistent
    be, fe = make_vbd(xs0, backend_domid=0, frontend_domid=1, devid=devid)
    offer = {"persistent": persistent, "unwritten_reads": True, "peek": True,
             "max_indirect_segments": rng.choice([0, 32, 256])}
    backend.serve(be, offer=offer, image={"sectors": SECTORS, "seed": case}, session_timeout=30)
    config = BlkfrontConfig(persistent=persistent, num_queues=rng.randint(1, 2), ring_page_order=rng.randint(0, 1),
                            max_indirect_segments=256, connect_timeout=5.0)
    reads = 0
    with BlkFront.attach(xen.platform(1), devid, config=config) as dev:
        assert dev.info.persistent is persistent
        for round_ in range(6):
            # Data of our own goes through the pool's pages first...
            writes = []
            with dev.batch():
                for _ in range(rng.randint(1, 8)):
                    sector = rng.randrange(SECTORS - 300)
                    nr = rng.choice([1, 3, 8, 16, 64, 200, 300])
                    writes.append(dev.submit_write(sector, known_data(1000 + round_, sector * 512, nr * 512)))
            for fut in writes:
                fut.result(10)
            # ...then reads the backend says it did, and did not.
            pending = []
            with dev.batch():
                for _ in range(rng.randint(1, 8)):
                    sector = rng.randrange(SECTORS - 300)
                    nr = rng.choice([1, 2, 8, 16, 40, 128, 300])
                    pending.append((dev.submit_read(sector, nr), nr))
            for fut, nr in pending:
                data = fut.result(10)
                reads += 1
                assert data == bytes(nr * 512), (
                    f"a READ answered OKAY without data returned {nr * 512 - data.count(0)} non-zero bytes "
                    "of earlier requests (XSA-403)")
        assert dev.failed is None, dev.failed
    done = backend.wait_done(20)
    remove_vbd(xs0, be, fe)
    assert done["error"] is None, done
    assert done["kinds"].get("unwritten_read", 0) >= reads > 0
    assert done["kinds"].get("unrelated_bytes", 0) == 0, (
        f"the backend found {done['kinds']['unrelated_bytes']} bytes of older data in granted pages (XSA-403)")
