"""Our blkfront against Linux's xen-blkback, on real Xen, self-attached in dom0.

Owns: proof that BlkFront (this process; frontend domid 0) drives the kernel blkback
(backend domid 0, a loop device over an image file, `physical-device` written by the
toolstack helper) with verified I/O: direct and indirect requests, a multi-page ring,
multi-queue, persistent grants, flush and discard, with the data checked by dom0 reading
the image file itself. Also the other end of each dimension: one page, one queue, no
indirect descriptors, grants per request, and the x86_32 ABI. What the kernel blkback
advertised is read from its directory, what it negotiated from its own log line.
After every test: all our grants released (checked sharers, no gntalloc mapping left),
the kernel blkback holds no vbd, no loop device is left on the image.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from blk_helpers import (
    MiB,
    CheckedPlatform,
    Disk,
    checked_platform,  # noqa: F401 - fixture
    dmesg,
    exercise,
    frontend_released,
    no_vbd_left,  # noqa: F401 - fixture
    read_key,
    xs_fixture,  # noqa: F401 - fixture "xs"
)
from guests import self_attach_kernel_vbd

from xentools.devices.blkfront import BlkFront, BlkfrontConfig

DISK = 8 * MiB
# xvdb and xvdc: distinct from the guests' tests and the benchmark's.
FULL_DEVID, MINIMAL_DEVID = 51728, 51744


def loops_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def blkback_two_queues():
    """Linux blkback offers one queue per dom0 CPU by default (its max_queues parameter, read
    when it probes a vbd); ask for 2 whatever the CPU count, and put the value back after."""
    param = Path("/sys/module/xen_blkback/parameters/max_queues")
    before = param.read_text().strip()
    param.write_text("2")
    yield
    param.write_text(before)


def blkback_line(devid: int) -> str:
    """Linux blkback's "using N queues, protocol P (abi) [persistent grants]" line of this vbd
    (the last one: an earlier test's vbd of the same number may have logged one too)."""
    lines = [line for line in dmesg(f"backend/vbd/0/{devid}: using") if "xen-blkback" in line]
    assert lines, f"xen-blkback logged no connection of vbd 0/{devid}"
    return lines[-1]


@pytest.mark.usefixtures("no_vbd_left")
def test_full_transport_multi_page_multi_queue_indirect_persistent(tmp_path, xs, checked_platform: CheckedPlatform,
                                                                    blkback_two_queues):
    disk = Disk(tmp_path / "full.raw", DISK, seed=1)
    with self_attach_kernel_vbd(xs, disk.path, devid=FULL_DEVID) as vbd:
        backend = vbd.paths.backend
        vbd.wait_backend_state({2}, timeout=60)  # InitWait: blkback has written its offer
        # What Linux blkback offers before the frontend connects (xen-in-qemu.md lists them).
        offered = {key: read_key(xs, f"{backend}/{key}") for key in (
            "feature-max-indirect-segments", "multi-queue-max-queues", "max-ring-page-order")}
        assert int(offered["feature-max-indirect-segments"]) >= 256
        assert int(offered["max-ring-page-order"]) >= 4
        assert offered["multi-queue-max-queues"] == "2"
        queues = 2
        config = BlkfrontConfig(ring_page_order=4, num_queues=2, max_indirect_segments=256, persistent=True)
        dev = BlkFront.attach(checked_platform, vbd.paths.frontend, config=config)
        try:
            # Linux blkback writes these only when it connects.
            for key in ("feature-persistent", "feature-flush-cache", "feature-discard"):
                assert read_key(xs, f"{backend}/{key}") == "1", key
            info = dev.info
            assert info.ring_page_order == 4 and info.ring_entries == 512
            assert info.num_queues == queues
            assert info.segments_per_request == 256 and info.persistent
            assert info.flush_cache and info.discard
            # What we wrote, and what the kernel says it connected with.
            front = vbd.paths.frontend
            assert read_key(xs, f"{front}/multi-queue-num-queues") == str(queues)
            assert read_key(xs, f"{front}/queue-1/ring-ref15") is not None  # 16 pages per ring
            line = blkback_line(FULL_DEVID)
            assert f"using {queues} queues" in line and "x86_64-abi" in line and "persistent grants" in line, line

            stats = exercise(dev, disk, seed=11)
            assert stats["direct_requests"] > 0 and stats["indirect_requests"] > 0, stats
            assert stats["errors"] == 0 and stats["spurious_events"] <= stats["events"], stats
        finally:
            dev.close()
        frontend_released(dev, checked_platform)
        # The kernel blkback let go of the rings and grants before it wrote Closed.
        assert vbd.backend("state") == "6"
    assert loops_of(disk.path) == ""
    disk.assert_file_matches()


@pytest.mark.usefixtures("no_vbd_left")
def test_minimal_transport_one_page_direct_only_per_request_grants_x86_32(tmp_path, xs, checked_platform: CheckedPlatform):
    disk = Disk(tmp_path / "minimal.raw", DISK, seed=2)
    with self_attach_kernel_vbd(xs, disk.path, devid=MINIMAL_DEVID) as vbd:
        config = BlkfrontConfig(ring_page_order=0, num_queues=1, max_indirect_segments=0,
                                persistent=False, protocol="x86_32-abi")
        dev = BlkFront.attach(checked_platform, vbd.paths.frontend, config=config)
        try:
            info = dev.info
            assert info.ring_page_order == 0 and info.ring_entries == 32 and info.num_queues == 1
            assert info.segments_per_request == 11 and not info.persistent
            assert read_key(xs, f"{vbd.paths.frontend}/protocol") == "x86_32-abi"
            assert read_key(xs, f"{vbd.paths.frontend}/ring-ref") is not None  # one page: no ring-ref0
            line = blkback_line(MINIMAL_DEVID)
            assert "using 1 queues" in line and "x86_32-abi" in line and "persistent grants" not in line, line

            stats = exercise(dev, disk, seed=12)
            assert stats["direct_requests"] > 0 and stats["indirect_requests"] == 0, stats
            assert stats["errors"] == 0, stats
        finally:
            dev.close()
        frontend_released(dev, checked_platform)
        assert vbd.backend("state") == "6"
    assert loops_of(disk.path) == ""
    disk.assert_file_matches()
