"""SoftwareXen and SoftwarePlatform: starting, using and stopping a whole software Xen."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from xentools.platform.interface import PAGE_SIZE, Platform, PlatformError, XenstoreError
from xentools.platform.sim.launcher import SoftwareXen
from xentools.platform import barrier as barrier_module
from xentools.platform.sim.platform import SoftwarePlatform


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_start_and_stop_leave_nothing_behind():
    with SoftwareXen(domains=(0, 1, 2)) as xen:
        root, pids = xen.root_dir, xen.pids
        assert len(pids) == 2 and xen.alive()
        names = set(os.listdir(root))
        assert {"grantd.sock", "xenstored.sock", "xenstored.sock.d1", "xenstored.sock.d2"} <= names
    assert not os.path.exists(root)
    assert all(gone(pid) for pid in pids)
    assert xen.pids == [] and not xen.alive()


def test_domains_get_xenstore_grants_and_event_channels():
    with SoftwareXen(domains=(0, 1)) as xen:
        dom0, dom1 = xen.platform(0), xen.platform(1)
        assert isinstance(dom1, Platform) and dom1.name == "software" and dom1.domid == 1

        xs1 = dom1.open_xenstore()
        xs0 = dom0.open_xenstore()
        try:
            # The domain's home is its own: relative paths land there, perms say so.
            xs1.write("device/test", "hello")
            assert xs0.read("/local/domain/1/device/test") == b"hello"
            assert xs0.get_perms("/local/domain/1")[0] == "n1"
            assert xs0.read("/local/domain/1/domid") == b"1"
            assert xs0.is_introduced(1)
            with pytest.raises(XenstoreError):
                xs1.write("/local/domain/0/stolen", "x")
        finally:
            xs1.close()
            xs0.close()

        gntshr, gnttab = dom1.open_gntshr(), dom0.open_gnttab()
        ev0, ev1 = dom0.open_evtchn(), dom1.open_evtchn()
        pages = gntshr.share(0, 2)
        pages.buf[PAGE_SIZE:PAGE_SIZE + 5] = b"front"
        mapped = gnttab.map(1, pages.refs, writable=True)
        assert bytes(mapped.buf[PAGE_SIZE:PAGE_SIZE + 5]) == b"front"
        port0 = ev0.bind_unbound(1)
        port1 = ev1.bind_interdomain(0, port0)
        assert select.select([ev1], [], [], 5)[0] and ev1.pending() == port1
        ev0.notify(port0)  # masked: stays pending until unmask
        ev1.unmask(port1)
        assert select.select([ev1], [], [], 5)[0] and ev1.pending() == port1
        gnttab.unmap(mapped)
        gntshr.unshare(pages)
        for h in (gntshr, gnttab, ev0, ev1):
            h.close()


def test_add_domain_later_and_unknown_domains():
    with SoftwareXen() as xen:
        assert xen.domains == [0]
        with pytest.raises(PlatformError, match=r"sim\.unknown_domain"):
            xen.platform(5)
        xen.add_domain(5)
        xs = xen.platform(5).open_xenstore()
        try:
            assert xs.get_domain_path(5) == "/local/domain/5"
            xs.write("x", "1")
        finally:
            xs.close()
        with pytest.raises(PlatformError, match=r"sim\.bad_domid"):
            xen.add_domain(0x7FF0)


def test_given_root_dir_is_kept_with_logs_but_sockets_go(tmp_path):
    root = tmp_path / "sim"
    with SoftwareXen(str(root), domains=(0, 3)) as xen:
        pids = xen.pids
        assert (root / "grantd.sock").exists()
    assert root.is_dir()
    assert sorted(os.listdir(root)) == ["grantd.log", "xenstored.log"]
    assert all(gone(pid) for pid in pids)


def test_a_killed_service_is_noticed_and_stop_still_cleans_up():
    xen = SoftwareXen(domains=(0, 1)).start()
    root, pids = xen.root_dir, xen.pids
    os.kill(pids[1], signal.SIGKILL)  # grantd
    deadline = time.monotonic() + 10
    while xen.alive():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(PlatformError, match=r"grantd\.connection"):
        xen.platform(0).open_evtchn()
    xen.stop()
    assert not os.path.exists(root)
    assert all(gone(pid) for pid in pids)


def test_start_failure_reports_and_leaves_nothing(tmp_path):
    root = tmp_path / "busy"
    with SoftwareXen(str(root)) as first:
        with pytest.raises(PlatformError, match=r"sim\.service_died: .*exited"):
            SoftwareXen(str(root)).start()
        # The second launcher did not disturb the first, nor remove its sockets.
        assert first.alive()
        assert sorted(os.listdir(root)) == [
            "grantd.log", "grantd.sock", "xenstored.log", "xenstored.sock"
        ]
        with first.platform(0).open_gntshr() as gntshr:
            gntshr.share(0, 1)
    with pytest.raises(PlatformError, match=r"sim\.root_too_long"):
        SoftwareXen("/tmp/" + "x" * 100).start()
    assert not os.path.exists("/tmp/" + "x" * 100)


def test_run_software_xen_in_the_foreground_until_sigterm(tmp_path):
    root = tmp_path / "fg"
    script = textwrap.dedent(
        """
        import sys
        from xentools.platform.sim.launcher import run_software_xen
        def ready(xen):
            print(" ".join(map(str, xen.pids)), flush=True)
        run_software_xen(sys.argv[1], (0, 1), on_ready=ready)
        print("stopped", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert select.select([proc.stdout], [], [], 20)[0]
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    assert (root / "xenstored.sock.d1").exists()
    dom1 = SoftwarePlatform(str(root), 1)
    xs = dom1.open_xenstore()
    xs.write("alive", "yes")
    xs.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert proc.stdout.read() == "stopped\n"
    proc.stdout.close()
    assert all(gone(pid) for pid in pids)
    assert sorted(os.listdir(root)) == ["grantd.log", "xenstored.log"]


def test_software_platform_paths_and_barrier(tmp_path):
    dom0 = SoftwarePlatform(str(tmp_path), 0)
    dom7 = SoftwarePlatform(str(tmp_path), 7)
    assert dom0.xenstored_path == str(tmp_path / "xenstored.sock")
    assert dom7.xenstored_path == str(tmp_path / "xenstored.sock.d7")
    assert dom7.grantd_path == str(tmp_path / "grantd.sock")
    with pytest.raises(PlatformError, match=r"sim\.bad_domid"):
        SoftwarePlatform(str(tmp_path), -1)
    barrier = barrier_module.full_barrier()
    assert dom0.full_barrier is barrier  # the same barrier as real Xen's platform
    if os.uname().machine == "x86_64":
        assert barrier is not None  # MFENCE in an executable page
    if barrier is not None:
        for _ in range(1000):
            assert barrier() is None
    with pytest.raises(PlatformError, match=r"grantd\.connection"):
        dom0.open_gntshr()
