"""Our blkfront in a PV domU, against Linux's xen-blkback and against our blkback in dom0,
and what a domU is told when a piece it needs is missing.

Owns: proof that a userspace frontend in an unprivileged domain works on real Xen: the domU
(tests/xen/domu.py: the repository's .venv Python in its initramfs) runs BlkFront on
the real platform — grants from gntalloc as a domU, an event channel bound to dom0's
backend, xenstore through /dev/xen/xenbus with a domU's permissions — on a vbd that dom0
wrote at the standard places (frontend directory /local/domain/<domU>/device/vbd/<devid>,
owned by the domU, readable by dom0; backend directory owned by dom0, readable by the domU;
one transaction, toolstack.create_vbd); the domU's kernel blkfront is never loaded:
vbd 51712, served by Linux's blkback from a loop device (backend/vbd/). Not yet here: the
same against our blkback in dom0 (backend/xtvbd/): in the one nested run that tried it, the
domU's xenstore READ of our backend's feature-persistent over /dev/xen/xenbus got no reply
within 60 s, after the Linux-blkback vbd had closed; cause not found (issue 13 stays open).
The domU reads (1 MiB: indirect; 44 KiB: the largest direct request; 4 KiB,
512 B) and checks the data against the seed's content, writes (256 KiB at an odd sector,
4 KiB, 512 B, eight pages at once), reads them back and flushes, with the multi-page ring,
two queues, indirect segments and persistent grants both backends offer. After its close,
and while the domU waits alive, dom0 checks from Xen's own tables that none of the grant refs
the domU shared is still mapped by anyone and that none of its ports is still bound, the
backend reached Closed, and the image file
holds exactly the seed's content with the planned writes.

Bad input, in a second domU (task "bad-input" of domu_guest.py): `xentools blk info` and
`xentools doctor` say in one line what is missing and how to get it, and exit 1, never with
a traceback, when
- the domU has no gntalloc device (xen-gntalloc not loaded): `modprobe xen-gntalloc`;
- the vbd's frontend directory is not the domU's (dom0 wrote it owned by dom0 alone): the
  permissions dom0 must give, and `xentools vbd create --frontend-domid N`;
- the domU has no /dev/xen/xenbus: mount devtmpfs (or xenfs and XENSTORED_PATH);
and that doctor, in a domU with everything, lists the xenbus device and a vbd it may use.
The vbd the frontend tries is served by Linux's blkback (waiting in InitWait), so the
frontend gets as far as it can before it needs the missing piece.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from blk_helpers import (
    CLOSED,
    INIT_WAIT,
    Disk,
    no_vbd_left,  # noqa: F401 - fixture
    xs_fixture,  # noqa: F401 - fixture "xs"
)
from domu import XenTables, acknowledge, domu_config, domu_initramfs
from domu_guest import DISK_SIZE, FRONT_CONFIG, plan_writes
from guests import XVDA, Guest, guest_kernel, guest_lines, unique_name, xl_domains

from xentools.devices.toolstack import create_vbd, destroy_vbd

KERNEL_DEVID, DENIED_DEVID = XVDA, XVDA + 32  # xvda, xvdc
# Boot (~6 s), Python in the domU (~18x slower than the host), the workload; x3 on a busy host.
TIMEOUT = 300.0
SEED = 13
_CLI = re.compile(r"^cli (\S+) rc=(-?\d+) stdout=(\".*\") stderr=(\".*\")$")


@pytest.fixture(scope="module")
def kernel():
    return guest_kernel()


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory, kernel):
    return domu_initramfs(tmp_path_factory.mktemp("domu") / "initramfs.cpio", kernel)


def released_checked_from_dom0(xen: XenTables, domid: int, released: dict) -> dict:
    """What Xen's tables say of the domU's refs and ports once its frontend closed."""
    active = xen.active_grants(domid)
    ports = xen.bound_ports(domid)
    assert released["refs"] and released["ports"], f"the frontend shared no grant or bound no port: {released}"
    # The xenstore and console rings (reserved grants 0 and 1 that xenstored and xenconsoled
    # map) and their channels: what shows that the dumps were read for this domain.
    assert active, f"Xen lists no active grant of d{domid} at all (xenstored maps its ring)"
    assert ports, f"Xen lists no bound port of d{domid} at all"
    still_mapped = sorted({g.ref for g in active} & set(released["refs"]))
    still_bound = sorted({p.port for p in ports} & set(released["ports"]))
    assert not still_mapped, f"grant refs of d{domid} still mapped after the close: {still_mapped}"
    assert not still_bound, f"ports of d{domid} still bound after the close: {still_bound}"
    return {"active_grants_left": len(active), "bound_ports_left": len(ports)}


def frontend_reports(lines: list[str], devid: int) -> tuple[dict, dict, dict]:
    def one(word: str) -> dict:
        found = [line for line in lines if line.startswith(f"{word} {devid} ")]
        assert len(found) == 1, f"expected one '{word} {devid}' line from the domU: {lines}"
        return json.loads(found[0].split(" ", 2)[2])

    return one("attached"), one("workload"), one("released")


@pytest.mark.usefixtures("no_vbd_left")
def test_our_blkfront_in_a_domu_on_linux_blkback(tmp_path, kernel, initramfs, xs, capsys):
    kernel_disk = Disk(tmp_path / "kernel-blkback.raw", DISK_SIZE, seed=SEED)
    cfg = domu_config(unique_name("xt-domu"), kernel, initramfs, task="blkfront", vbds=f"{KERNEL_DEVID}", seed=SEED)
    results = os.environ.get("NESTED_RESULTS")
    xen = XenTables(Path(results) / "domu" if results else None)

    with Guest(cfg, tmp_path) as guest:
        domid = guest.domid
        kvbd = guest.attach_kernel_vbd(xs, kernel_disk.path, devid=KERNEL_DEVID)
        assert kvbd.paths.frontend == f"/local/domain/{domid}/device/vbd/{KERNEL_DEVID}"
        kvbd.wait_backend_state({INIT_WAIT})
        guest.unpause()

        found = guest.wait_for(re.compile(rf"GUEST: released {KERNEL_DEVID} (.*)"), timeout=TIMEOUT)
        released = json.loads(found.group(1))
        # Linux blkback unmapped the rings and grants before it wrote Closed.
        assert kvbd.wait_backend_state({CLOSED}, timeout=30) == CLOSED
        checked = released_checked_from_dom0(xen, domid, released)
        acknowledge(xs, domid, KERNEL_DEVID)

        guest.wait_for("GUEST: python exited 0", timeout=TIMEOUT)
        lines = guest_lines(guest.console())
        guest.destroy()
        assert domid not in [d for _, d in xl_domains()]
    assert xl_domains() == [("Domain-0", 0)]

    info, stats, released = frontend_reports(lines, KERNEL_DEVID)
    with capsys.disabled():
        print(f"\ndomU {cfg.name}: {guest.timings}")
        print(f"domU blkfront on Linux blkback: ring order {info['ring_page_order']}, {info['num_queues']} queues, "
              f"{info['segments_per_request']} segments, persistent {info['persistent']}; "
              f"{stats['direct_requests']} direct + {stats['indirect_requests']} indirect requests; "
              f"{len(released['refs'])} refs and {len(released['ports'])} ports released; "
              f"Xen after close: {checked}")
    notes = [line for line in lines if line.startswith("note ")]
    if notes:
        print(f"domU notes (re-runs after a signal): {notes}")

    assert info["ring_page_order"] == FRONT_CONFIG["ring_page_order"], info
    assert info["num_queues"] == FRONT_CONFIG["num_queues"], info
    assert info["segments_per_request"] == FRONT_CONFIG["max_indirect_segments"], info
    assert info["persistent"] is True, info
    assert stats["direct_requests"] > 0 and stats["indirect_requests"] > 0, stats
    assert stats["errors"] == 0, stats
    closed = released["close_report"]
    assert closed.get("backend_closed") is True and closed.get("leaked_pages") == 0, closed
    assert closed.get("still_mapped") == 0, closed
    assert released["left_at_close"] and set(released["left_at_close"]) == {0}, released
    assert released["gntalloc_maps"] == 0, released

    for offset, data in plan_writes(SEED, DISK_SIZE):
        kernel_disk.model[offset : offset + len(data)] = data
    kernel_disk.assert_file_matches()


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
    disk = Disk(tmp_path / "good.raw", DISK_SIZE, seed=SEED)
    cfg = domu_config(unique_name("xt-domu-bad"), kernel, initramfs, task="bad-input",
                      load="xen-evtchn", good=KERNEL_DEVID, denied=DENIED_DEVID)
    with Guest(cfg, tmp_path) as guest:
        domid = guest.domid
        good = guest.attach_kernel_vbd(xs, disk.path, devid=KERNEL_DEVID)
        denied = create_vbd(xs, backend_domid=0, frontend_domid=domid, devid=DENIED_DEVID, params="/dev/null",
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
    assert doctor_line(out, f"vbd {KERNEL_DEVID}").startswith("ok"), out
    assert "gntalloc" in one_error_line(err)

    rc, out, err = runs["denied-blk"]
    shown["no permission: blk info"] = line = one_error_line(err)
    assert rc == 1 and "EACCES" in line and denied.frontend in line, line
    assert "owned by the frontend's domain" in line and "--frontend-domid" in line, line
    rc, out, err = runs["denied-doctor"]
    shown["no permission: doctor"] = line = doctor_line(out, f"vbd {DENIED_DEVID}")
    assert rc == 1 and line.startswith("MISSING") and f"--frontend-domid {domid}" in line, out
    assert doctor_line(out, "/dev/xen/gntalloc").startswith("ok"), out
    assert one_error_line(err).endswith(f"missing vbd {DENIED_DEVID}"), err

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
