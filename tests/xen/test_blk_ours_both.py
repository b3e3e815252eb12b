"""Our blkfront against our blkback over real Xen grants and event channels, in dom0.

Owns: proof that the two halves we wrote talk through Xen itself, not the software Xen: the
backend runs in its own process (`python -m xentools blkback serve`) and maps, through
gntdev, the pages this process shares through gntalloc; events cross real event channels.
One backend process serves two sessions in turn on the same vbd: the full transport
(multi-page ring, two queues, indirect, persistent grants) and then, after a clean close,
the minimal one (one page, one queue, direct only, grants per request, x86_32 ABI).
Checked: the verified workload (the image file read by dom0 equals what was written), the
backend's grant mappings (as its /proc/PID/maps shows them) present while connected and ALL
gone once it reached Closed while the process still runs, every grant of ours released,
the backend's conformance report clean, and a clean exit when the vbd is removed; the
backend's compiled wait loop took the events itself (real Xen's direct link), with its watch
of req_prod on ($XENTOOLS_BLKBACK_XEN_SPIN_US).
"""

from __future__ import annotations

import pytest
from blk_helpers import (
    CLOSED,
    DOM0,
    INIT_WAIT,
    XEN_BACKEND_BUS,
    MiB,
    CheckedPlatform,
    Disk,
    OurBlkback,
    exercise,
    frontend_released,
    no_vbd_left,  # noqa: F401 - fixture
    our_vbd,
    read_key,
    self_frontend_dir,
    wait_until,
    xs_fixture,  # noqa: F401 - fixture "xs"
)

from xentools.devices.blkback_ringloop import XEN_SPIN_ENV, compiled
from xentools.devices.blkfront import BlkFront, BlkfrontConfig
from xentools.devices.toolstack import destroy_vbd

DEVID = 51760  # xvdd
SESSIONS = {
    "full": BlkfrontConfig(ring_page_order=4, num_queues=2, max_indirect_segments=256, persistent=True),
    "minimal": BlkfrontConfig(ring_page_order=0, num_queues=1, max_indirect_segments=0, persistent=False,
                              protocol="x86_32-abi"),
}


@pytest.mark.usefixtures("no_vbd_left")
def test_our_frontend_on_our_backend_two_sessions(tmp_path, xs):
    disk = Disk(tmp_path / "ours.raw", 8 * MiB, seed=3)
    paths = our_vbd(xs, disk.path, frontend_domid=DOM0, devid=DEVID, frontend_dir=self_frontend_dir(DEVID))
    try:
        # The backend's compiled wait watches req_prod before it sleeps here (off by default
        # on real Xen: the kernel frontend's tests and the bench run it without the watch).
        with OurBlkback(paths.backend, disk.path, tmp_path, "--verbose", env={XEN_SPIN_ENV: "200"}) as backend:
            backend.wait_state(xs, {INIT_WAIT})
            assert backend.grant_maps() == 0
            # The kernel lists our directory on its backend bus, but no driver claims it
            # (under backend/vbd/ its xen-blkback would).
            device = XEN_BACKEND_BUS / f"xtvbd-{DOM0}-{DEVID}"
            assert device.exists() and not (device / "driver").exists()
            for seed, (name, config) in enumerate(SESSIONS.items(), start=20):
                platform = CheckedPlatform()
                dev = BlkFront.attach(platform, paths.frontend, config=config)
                try:
                    info = dev.info
                    assert info.num_queues == config.num_queues, name
                    assert info.ring_page_order == config.ring_page_order, name
                    assert info.persistent == config.persistent, name
                    assert info.flush_cache and info.discard, name
                    # The backend maps our ring pages: the kernel shows them in its map.
                    assert backend.grant_maps() >= config.num_queues, name
                    stats = exercise(dev, disk, seed=seed)
                    if config.max_indirect_segments:
                        assert stats["indirect_requests"] > 0, (name, stats)
                    else:
                        assert stats["indirect_requests"] == 0, (name, stats)
                    assert stats["direct_requests"] > 0 and stats["errors"] == 0, (name, stats)
                finally:
                    dev.close()
                frontend_released(dev, platform)
                # The backend reached Closed after unmapping everything, and keeps running,
                # waiting for the next connection.
                assert backend.wait_state(xs, {CLOSED}) == CLOSED
                assert backend.alive()
                assert backend.grant_maps() == 0, f"{name}: the backend still maps grants after Closed"
            destroy_vbd(xs, paths)
            assert backend.wait_exit() == 0
            backend.exited_cleanly()
            report = backend.report()
            wait = backend.compiled_wait()
    finally:
        destroy_vbd(xs, paths)
    print(f"our blkback's conformance report for our frontend: {report}")
    print(f"our blkback's compiled wait loop (watch of 200 us): {wait}")
    if compiled() is not None:  # the compiled wait served our frontend's queues through real Xen's links
        assert wait.get("events", 0) > 0 and wait.get("rounds", 0) > 0, wait
    assert report["backend"] == paths.backend
    assert report["total"] == 0 and report["frontends"][paths.frontend]["requests"]["checked"] > 0, report
    assert read_key(xs, paths.backend) is None
    disk.assert_file_matches()
