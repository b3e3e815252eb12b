"""What a userspace frontend in a domU is told when a piece is missing, on the host: the fix
hints of the real platform (gntalloc/evtchn/gntdev device nodes, the xenbus device), the
EACCES hint of our xenstore client, and doctor's vbd permission checks, run as a domU against
the software xenstored. (The same paths on real Xen: tests/xen/test_domu.py.)"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from xentools.devices.toolstack import create_vbd
from xentools.platform.interface import XenstoreError
from xentools.platform.sim.xenstored import domain_socket_path, spawn_xenstored
from xentools.platform.xen import platform as xen_platform
from xentools.platform.xenstore import XENBUS_DEVICE, XenstoreClient
from xentools.tools import doctor

DOMU = 5


@pytest.fixture
def server() -> Iterator[str]:
    sockdir = tempfile.mkdtemp(prefix="xd", dir="/tmp")  # short: unix socket paths are limited
    path = os.path.join(sockdir, "socket")
    proc = spawn_xenstored(path)
    yield path
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(sockdir, ignore_errors=True)


def test_device_fix_names_the_module_or_the_access(tmp_path, monkeypatch):
    monkeypatch.setattr(xen_platform, "DEV_XEN", tmp_path)
    assert xen_platform.device_fix("gntalloc", errno.ENOENT) == (
        f"{tmp_path}/gntalloc is absent: load its driver with `modprobe xen-gntalloc` (as root)")
    (tmp_path / "evtchn").write_text("")
    assert "run as root, or give this user read-write access" in xen_platform.device_fix("evtchn", errno.EACCES)
    assert xen_platform.device_fix("evtchn", errno.EINVAL) == ""


def test_xenbus_fix_only_for_the_xenbus_device(tmp_path):
    assert xen_platform.xenbus_fix(str(tmp_path / "xenstored.sock")) == ""
    if not os.path.exists(XENBUS_DEVICE):
        fix = xen_platform.xenbus_fix(XENBUS_DEVICE)
        assert "mount -t devtmpfs devtmpfs /dev" in fix and "XENSTORED_PATH=/proc/xen/xenbus" in fix


@pytest.mark.parametrize(("perms", "domid", "access", "allowed"), [
    (["n5", "r0"], 5, "w", True),    # the owner may do anything
    (["n0", "r5"], 5, "r", True),
    (["n0", "r5"], 5, "w", False),
    (["n0"], 5, "r", False),         # the first entry is also everyone else's default
    (["r0"], 5, "r", True),
    (["n0", "b5"], 5, "w", True),
    (["b0", "n5"], 5, "w", False),   # a domain's own entry beats the default
])
def test_permission_rule(perms, domid, access, allowed):
    assert doctor._may(perms, domid, access) is allowed


def test_a_domu_is_told_which_vbd_it_may_not_use_and_how_dom0_fixes_it(server, monkeypatch):
    with XenstoreClient.connect(server, timeout=5.0) as dom0:
        dom0.introduce(DOMU, 4096, 5)
        dom0.write(f"/local/domain/{DOMU}/domid", str(DOMU))
        dom0.set_perms(f"/local/domain/{DOMU}/domid", ["n0", f"r{DOMU}"])
        good = create_vbd(dom0, backend_domid=0, frontend_domid=DOMU, devid=51712, params="/a",
                          backend_kind="xtvbd")
        denied = create_vbd(dom0, backend_domid=0, frontend_domid=DOMU, devid=51728, params="/b",
                            backend_kind="xtvbd")
        for node in [denied.frontend] + [f"{denied.frontend}/{k}" for k in dom0.directory(denied.frontend)]:
            dom0.set_perms(node, ["n0"])
    monkeypatch.setenv("XENSTORED_PATH", domain_socket_path(server, DOMU))

    checks = {c.name: c for c in doctor._vbd_checks()}
    assert checks["vbd 51712"].ok, checks
    assert good.backend in checks["vbd 51712"].found
    bad = checks["vbd 51728"]
    assert not bad.ok and bad.required and bad.fix == doctor.VBD_FIX.format(domid=DOMU)

    with XenstoreClient.connect(timeout=5.0) as domu:
        with pytest.raises(XenstoreError) as exc:
            domu.read(f"{denied.frontend}/backend")
    message = str(exc.value)
    assert exc.value.errno_name == "EACCES" and "\n" not in message
    assert message.startswith(f"xenstore: READ {denied.frontend}/backend: EACCES; this domain has no permission")
    assert "xentools vbd create --frontend-domid N" in message
