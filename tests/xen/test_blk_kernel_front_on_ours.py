"""Linux's xen-blkfront, in a PV domU booted with `xl create`, on our blkback.

Owns: proof that a frontend nobody here wrote, the guest kernel's blkfront, reads and
writes a disk served by OUR blkback process (`python -m xentools blkback serve`, with its
conformance report), over real grants and event channels:
- the vbd's two directories are written in one transaction (toolstack.create_vbd), the
  backend one under backend/xtvbd/ where dom0's xen-blkback does not claim it;
- the guest ("disk-io" scenario of tests/xen/guests.py) reads a region with O_DIRECT and
  prints its sha256, which must equal dom0's own sha256 of the image file there; it writes
  a known pattern (O_DIRECT, then fsync: a flush request) that dom0 then finds in the image,
  with every other byte unchanged;
- our conformance report for the Linux frontend is printed: no violation, and non-zero
  counts of what was checked (requests read and written, segments, bytes, rules exercised);
- the backend held grant mappings while connected (sampled from its /proc/PID/maps), and
  none once the guest's blkfront closed the device at poweroff (Linux's xenbus shutdown
  handler) and the backend wrote Closed;
- with the compiled ring loop, its wait loop slept, took and unmasked the ring's events and
  served without Python between wake-ups (the libxenevtchn handle's direct link; the
  counters of the line each queue logs at its end); the guest's domain is then destroyed completely
  (Xen keeps a domain whose pages are still mapped) and the backend exits cleanly.
"""

from __future__ import annotations

import hashlib
import json
import secrets

import pytest
from blk_helpers import (
    CLOSED,
    INIT_WAIT,
    KiB,
    MiB,
    Disk,
    OurBlkback,
    no_vbd_left,  # noqa: F401 - fixture
    our_vbd,
    xs_fixture,  # noqa: F401 - fixture "xs"
)
from guests import (
    Guest,
    build_initramfs,
    guest_extra,
    guest_kernel,
    guest_lines,
    pv_guest,
    unique_name,
    write_pattern,
    xl_domains,
)

from xentools.core.vbd import encode_vbd
from xentools.devices.blkback_ringloop import compiled
from xentools.devices.toolstack import destroy_vbd

XVDA = encode_vbd("xvda")

# Under nested TCG a guest boots in ~6 s on an idle host, ~3x that on a busy one.
BOOT_TIMEOUT = 150.0


@pytest.fixture(scope="module")
def kernel():
    return guest_kernel()


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory, kernel):
    return build_initramfs(tmp_path_factory.mktemp("guest") / "initramfs.cpio", kernel=kernel, scenarios=("disk-io",))


@pytest.mark.usefixtures("no_vbd_left")
def test_linux_blkfront_in_a_domu_reads_and_writes_through_our_blkback(tmp_path, kernel, initramfs, xs, capsys):
    disk = Disk(tmp_path / "guest.raw", 16 * MiB, seed=4)
    # 1 MiB read in 64 KiB O_DIRECT requests: 16 segments each, indirect for Linux blkfront.
    read_at, read_len = 4 * MiB, 1 * MiB
    write_at, write_len = 9 * MiB + 4 * KiB, 256 * KiB
    want_read = disk.sha256(read_at, read_len)
    token = f"xt{secrets.token_hex(6)}"
    pattern = write_pattern(token, write_len)
    extra = guest_extra("disk-io", read=(read_at, read_len), write=(write_at, write_len), token=token)
    cfg = pv_guest(unique_name("xt-ourback"), kernel.image, initramfs, extra)

    with Guest(cfg, tmp_path) as guest:
        paths = our_vbd(xs, disk.path, frontend_domid=guest.domid, devid=XVDA)
        try:
            assert paths.backend == f"/local/domain/0/backend/xtvbd/{guest.domid}/{XVDA}"
            assert paths.frontend == f"/local/domain/{guest.domid}/device/vbd/{XVDA}"
            with OurBlkback(paths.backend, disk.path, tmp_path, "--verbose") as backend:
                # Our backend is up (InitWait, its offer written) before the guest runs, so
                # the guest's blkfront connects at once. (Started while the guest booted,
                # the backend's interpreter sometimes hung or died of SIGSEGV during its
                # imports under nested TCG, about 1 run in 5; never once it was up first.)
                backend.wait_state(xs, {INIT_WAIT})
                guest.unpause()
                with backend.sample_grant_maps() as sampler:
                    guest.wait_for("GUEST: done disk-io", timeout=BOOT_TIMEOUT)
                    assert guest.wait_end() == "shutdown"
                lines = guest_lines(guest.console())
                assert sampler.peak > 0, "our blkback never mapped the guest's grants"
                # At poweroff Linux closes its xenbus devices (xenbus_dev_shutdown: Closing,
                # then waits for the backend): ours unmapped everything and wrote Closed,
                # and waits, alive, for a reconnection.
                assert backend.wait_state(xs, {CLOSED}, timeout=30) == CLOSED
                assert backend.grant_maps() == 0, "our blkback still maps grants after Closed"
                guest.destroy()  # Xen frees the domain only once nothing maps its pages
                assert guest.domid not in [domid for _, domid in xl_domains()]
                # The frontend directory went with the domain: the backend tears the device
                # down and exits; removing its own directory makes it exit in any case.
                destroy_vbd(xs, paths)
                backend.wait_exit()
                backend.exited_cleanly()
                report = backend.report()
                connected = [line for line in backend.stderr().splitlines() if "connecting" in line]
                wait = backend.compiled_wait()
        finally:
            destroy_vbd(xs, paths)
    assert xl_domains() == [("Domain-0", 0)]

    with capsys.disabled():
        print(f"\nour blkback's conformance report for Linux {kernel.version} blkfront: "
              f"{json.dumps(report, indent=1, sort_keys=True)}")
        print(f"our blkback: {connected[0] if connected else 'no connect line'}")
        print(f"our blkback's compiled wait loop: {wait}")
    assert report["backend"] == paths.backend
    # Clean, and "clean" comes with what was checked: Linux's frontend connected once, read
    # (indirect: 64 KiB requests), wrote and flushed, and every request passed every check.
    linux = report["frontends"][paths.frontend]
    assert report["total"] == 0 and linux["violations"] == {} and linux["requests"]["rejected"] == 0, report
    assert linux["connects"] == 1 and linux["disconnects"] == 1, linux
    ops = linux["requests"]["by_operation"]
    assert ops["read"]["direct"] + ops["read"]["indirect"] > 0 and ops["read"]["bytes"] >= read_len, ops
    assert ops["write"]["direct"] + ops["write"]["indirect"] > 0 and ops["write"]["bytes"] >= write_len, ops
    assert linux["segments"] > 0 and linux["rules_exercised"]["segment.last_sect"] > 0, linux
    assert linux["features"]["protocol"] == "x86_64-abi" and linux["features"]["persistent"] is True, linux
    # What Linux negotiated with us: its native ABI and persistent grants.
    assert len(connected) == 1 and "x86_64-abi" in connected[0] and "persistent True" in connected[0], connected

    # With the compiled ring loop, its wait loop took the ring's events itself on real Xen
    # (the libxenevtchn handle's direct link): it slept, took and unmasked events, and served.
    if compiled() is not None:
        assert wait.get("sleeps", 0) > 0 and wait.get("events", 0) > 0 and wait.get("rounds", 0) > 0, wait

    assert f"disk xvda {disk.size} bytes" in lines, lines
    assert f"read-sha256 {want_read}" in lines, lines
    assert f"wrote OK sha256 {hashlib.sha256(pattern).hexdigest()}" in lines, lines
    disk.model[write_at : write_at + write_len] = pattern
    disk.assert_file_matches()  # the guest's bytes are there, and nothing else changed
