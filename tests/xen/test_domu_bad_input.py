"""Bad input for a userspace frontend in a PV domU, on real Xen: what is missing is named.

Owns: proof that `xentools blk info` and `xentools doctor`, run in a domU (tests/xen/domu.py,
task "bad-input" of domu_guest.py), say in one line what is missing and how to get it, and
exit 1, never with a traceback, when
- the domU has no gntalloc device (xen-gntalloc not loaded): `modprobe xen-gntalloc`;
- the vbd's frontend directory is not the domU's (dom0 wrote it owned by dom0 alone): the
  permissions dom0 must give, and `xentools vbd create --frontend-domid N`;
- the domU has no /dev/xen/xenbus: mount devtmpfs (or xenfs and XENSTORED_PATH);
and that doctor, in a domU with everything, lists the xenbus device and a vbd it may use.
The vbd `good` is served by Linux's blkback (its backend waits in InitWait), so the frontend
gets as far as it can before it needs the missing piece.
"""

from __future__ import annotations

import json
import re

import pytest
from blk_helpers import INIT_WAIT, Disk, no_vbd_left, xs_fixture  # noqa: F401 - fixtures
from domu import domu_config, domu_initramfs
from guests import XVDA, Guest, guest_kernel, guest_lines, unique_name

from xentools.devices.toolstack import create_vbd, destroy_vbd

GOOD, DENIED = XVDA, XVDA + 32  # xvda, xvdc
TIMEOUT = 300.0
_CLI = re.compile(r"^cli (\S+) rc=(-?\d+) stdout=(\".*\") stderr=(\".*\")$")


@pytest.fixture(scope="module")
def kernel():
    return guest_kernel()


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory, kernel):
    return domu_initramfs(tmp_path_factory.mktemp("domu-bad") / "initramfs.cpio", kernel)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xentools: error: "), stderr
    return lines[0]


def doctor_line(stdout: str, name: str) -> str:
    """The doctor's line for check `name` with its fix line, if any, joined."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        words = line.split()
        if len(words) > 1 and line[9:].startswith(name):
            fix = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].lstrip().startswith("fix:") else ""
            return f"{line} {fix}"
    raise AssertionError(f"doctor printed no line for {name!r}: {stdout}")


@pytest.mark.usefixtures("no_vbd_left")
def test_domu_without_gntalloc_permission_or_xenbus_gets_one_line_with_the_fix(tmp_path, kernel, initramfs, xs, capsys):
    disk = Disk(tmp_path / "good.raw", 1 << 20, seed=5)
    cfg = domu_config(unique_name("xt-domu-bad"), kernel, initramfs, task="bad-input",
                      load="xen-evtchn", good=GOOD, denied=DENIED)
    with Guest(cfg, tmp_path) as guest:
        domid = guest.domid
        good = guest.attach_kernel_vbd(xs, disk.path, devid=GOOD)
        denied = create_vbd(xs, backend_domid=0, frontend_domid=domid, devid=DENIED, params="/dev/null",
                            backend_kind="xtvbd")
        guest.after_destroy(lambda: destroy_vbd(xs, denied))
        # The toolstack's mistake: the frontend directory left to dom0 alone.
        for node in [denied.frontend] + [f"{denied.frontend}/{k}" for k in xs.directory(denied.frontend)]:
            xs.set_perms(node, ["n0"])
        good.wait_backend_state({INIT_WAIT})
        guest.unpause()
        guest.wait_for("GUEST: python exited", timeout=TIMEOUT)
        lines = guest_lines(guest.console())
    assert "python exited 0" in lines, lines

    runs = {}
    for line in lines:
        found = _CLI.match(line)
        if found:
            runs[found.group(1)] = (int(found.group(2)), json.loads(found.group(3)), json.loads(found.group(4)))
    assert set(runs) == {"no-gntalloc-doctor", "no-gntalloc-blk", "denied-blk", "denied-doctor",
                         "no-xenbus-doctor", "no-xenbus-blk"}, lines
    shown = {}

    rc, out, err = runs["no-gntalloc-blk"]
    shown["no gntalloc: blk info"] = line = one_error_line(err)
    assert rc == 1 and "/dev/xen/gntalloc is absent" in line and "modprobe xen-gntalloc" in line, line
    rc, out, err = runs["no-gntalloc-doctor"]
    shown["no gntalloc: doctor"] = line = doctor_line(out, "/dev/xen/gntalloc")
    assert rc == 1 and line.startswith("MISSING") and "fix: modprobe xen-gntalloc" in line, out
    assert doctor_line(out, "domain").startswith("ok") and "domU" in doctor_line(out, "domain"), out
    assert doctor_line(out, "xenbus device").startswith("ok"), out
    assert doctor_line(out, "/dev/xen/gntdev").startswith("optional"), out  # a frontend needs no gntdev
    assert doctor_line(out, f"vbd {GOOD}").startswith("ok"), out
    assert "gntalloc" in one_error_line(err)

    rc, out, err = runs["denied-blk"]
    shown["no permission: blk info"] = line = one_error_line(err)
    assert rc == 1 and "EACCES" in line and denied.frontend in line, line
    assert f"owned by the frontend's domain" in line and "--frontend-domid" in line, line
    rc, out, err = runs["denied-doctor"]
    shown["no permission: doctor"] = line = doctor_line(out, f"vbd {DENIED}")
    assert rc == 1 and line.startswith("MISSING") and f"--frontend-domid {domid}" in line, out
    assert doctor_line(out, "/dev/xen/gntalloc").startswith("ok"), out
    assert one_error_line(err).endswith(f"missing vbd {DENIED}"), err

    rc, out, err = runs["no-xenbus-doctor"]
    shown["no xenbus: doctor"] = line = doctor_line(out, "xenbus device")
    assert rc == 1 and line.startswith("MISSING") and "mount -t devtmpfs" in line, out
    rc, out, err = runs["no-xenbus-blk"]
    shown["no xenbus: blk info"] = line = one_error_line(err)
    assert rc == 1 and "/dev/xen/xenbus is absent" in line and "mount -t devtmpfs" in line, line

    with capsys.disabled():
        print(f"\ndomU {cfg.name}: {guest.timings}")
        for what, text in shown.items():
            print(f"{what}: {text}")
