"""Our blkfront in a PV domU, against Linux's xen-blkback and against our blkback in dom0,
and what a domU is told when a piece it needs is missing.

Owns: proof that a userspace frontend in an unprivileged domain works on real Xen: the domU
(tests/xen/domu.py: the repository's .venv Python in its initramfs) runs BlkFront on
the real platform — grants from gntalloc as a domU, an event channel bound to dom0's
backend, xenstore through /dev/xen/xenbus with a domU's permissions — on vbds that dom0
wrote at the standard places (frontend directory /local/domain/<domU>/device/vbd/<devid>,
owned by the domU, readable by dom0; backend directory owned by dom0, readable by the domU;
one transaction, toolstack.create_vbd); the domU's kernel blkfront is never loaded.
One domU boot serves two vbds in turn: xvda from Linux's blkback (a loop device,
backend/vbd/), then xvdb from our blkback process (backend/xtvbd/). On each the domU reads
(1 MiB: indirect; 44 KiB: the largest direct request; 4 KiB, 512 B) and checks the data
against the seed's content, writes (256 KiB at an odd sector, 4 KiB, 512 B, eight pages at
once), reads them back and flushes, with the multi-page ring (order 4), two queues (Linux
blkback is asked for two whatever dom0's CPU count), indirect segments and persistent grants.
After each close, and while the domU waits alive, dom0 checks from Xen's own tables that none
of the grant refs the domU shared is still mapped by anyone and that none of its ports is
still bound, and that the backend reached Closed (our blkback: no grant mapping left in its
process); at the end each image file holds exactly the seed's content with the planned
writes, and our blkback's conformance report shows no violation.

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

Xen must run with spec-ctrl=eager-fpu (tests/nested/run.py): with lazy FPU switching the
nested Xen lost vCPU register state between this domU and dom0 (wrong bytes computed in the
domU, SIGSEGV, dom0's xl reading garbage); the `kernel` fixture checks Xen's command line.
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
    OurBlkback,
    no_vbd_left,  # noqa: F401 - fixture
    our_vbd,
    xs_fixture,  # noqa: F401 - fixture "xs"
)
from domu import XenTables, acknowledge, domu_config, domu_initramfs
from domu_guest import DISK_SIZE, FRONT_CONFIG, plan_writes
from test_blk_ours_vs_kernel import blkback_two_queues  # noqa: F401 - fixture
from guests import Guest, guest_kernel, guest_lines, record_rerun, unique_name, xl_domains

from xentools.core.vbd import encode_vbd
from xentools.devices.toolstack import create_vbd, destroy_vbd
from xentools.tools.images.xl import check_xl, run_xl

LINUX_DEVID, OURS_DEVID, DENIED_DEVID = encode_vbd("xvda"), encode_vbd("xvdb"), encode_vbd("xvdc")
KERNEL_DEVID = LINUX_DEVID
# Boot (~6 s), Python in the domU (~18x slower than the host), the workload; x3 on a busy host.
TIMEOUT = 300.0
SEED = 13
_CLI = re.compile(r"^cli (\S+) rc=(-?\d+) stdout=(\".*\") stderr=(\".*\")$")


@pytest.fixture(scope="module")
def kernel():
    # Without eager FPU switching (tests/nested/run.py XEN_ARGS), the nested Xen on QEMU TCG
    # lost vCPU register state between the domU and dom0: wrong bytes, SIGSEGV, in both.
    info = check_xl(["info"], timeout=60, on_rerun=record_rerun)
    line = next((x for x in info.stdout.splitlines() if x.startswith("xen_commandline")), "")
    assert "eager-fpu" in line, f"Xen runs without spec-ctrl=eager-fpu (add it to Xen's command line): {line!r}"
    return guest_kernel()


@pytest.fixture
def xen_console():
    """After the test: Xen's console ring (`xl dmesg`: grant and event channel errors) in
    the harness's results share, for the reader of a failure."""
    yield
    results = os.environ.get("NESTED_RESULTS")
    if results:
        out = run_xl(["dmesg"], timeout=60, on_rerun=record_rerun)
        (Path(results) / "domu").mkdir(parents=True, exist_ok=True)
        (Path(results) / "domu" / f"xl-dmesg-{unique_name('after')}.log").write_text(out.stdout + out.stderr)


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory, kernel):
    return domu_initramfs(tmp_path_factory.mktemp("domu") / "initramfs.cpio", kernel)


def released_line(devid: int) -> re.Pattern[str]:
    """The domU's whole "released" line: xenconsoled may have copied only part of a long
    line when the console is read (a partial match once cut the JSON short)."""
    return re.compile(rf"GUEST: released {devid} (\{{.*\}})\n")


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


def check_frontend(lines: list[str], devid: int, queues: int) -> tuple[dict, dict, dict]:
    """The domU's own account of vbd `devid`: the transport negotiated (multi-page ring,
    `queues` queues, indirect segments, persistent grants), direct and indirect requests
    without error, and everything given back at the close."""
    info, stats, released = frontend_reports(lines, devid)
    assert info["ring_page_order"] == FRONT_CONFIG["ring_page_order"], info
    assert info["num_queues"] == queues, info
    assert info["segments_per_request"] == FRONT_CONFIG["max_indirect_segments"], info
    assert info["persistent"] is True, info
    assert stats["direct_requests"] > 0 and stats["indirect_requests"] > 0, stats
    assert stats["errors"] == 0, stats
    closed = released["close_report"]
    assert closed.get("backend_closed") is True and closed.get("leaked_pages") == 0, closed
    assert closed.get("still_mapped") == 0, closed
    assert released["left_at_close"] and set(released["left_at_close"]) == {0}, released
    assert released["gntalloc_maps"] == 0, released
    return info, stats, released


@pytest.mark.usefixtures("no_vbd_left", "blkback_two_queues", "xen_console")
def test_our_blkfront_in_a_domu_on_linux_blkback_and_on_our_blkback(tmp_path, kernel, initramfs, xs, capsys):
    """One domU boot, two vbds in turn: Linux blkback's (xvda), then our blkback's (xvdb)."""
    linux_disk = Disk(tmp_path / "linux-blkback.raw", DISK_SIZE, seed=SEED)
    our_disk = Disk(tmp_path / "our-blkback.raw", DISK_SIZE, seed=SEED + 1)
    cfg = domu_config(unique_name("xt-domu"), kernel, initramfs, task="blkfront",
                      vbds=f"{LINUX_DEVID}+{OURS_DEVID}", seed=SEED)
    results = os.environ.get("NESTED_RESULTS")
    xen = XenTables(Path(results) / "domu" if results else None)
    checked = {}

    with Guest(cfg, tmp_path) as guest:
        domid = guest.domid
        kvbd = guest.attach_kernel_vbd(xs, linux_disk.path, devid=LINUX_DEVID)
        assert kvbd.paths.frontend == f"/local/domain/{domid}/device/vbd/{LINUX_DEVID}"
        paths = our_vbd(xs, our_disk.path, frontend_domid=domid, devid=OURS_DEVID)
        guest.after_destroy(lambda: destroy_vbd(xs, paths))
        assert paths.frontend == f"/local/domain/{domid}/device/vbd/{OURS_DEVID}"
        with OurBlkback(paths.backend, our_disk.path, tmp_path) as backend:
            kvbd.wait_backend_state({INIT_WAIT})
            backend.wait_state(xs, {INIT_WAIT})  # up before the domU runs (see test_blk_kernel_front_on_ours)
            guest.unpause()

            found = guest.wait_for(released_line(LINUX_DEVID), timeout=TIMEOUT)
            # Linux blkback unmapped the rings and grants before it wrote Closed.
            assert kvbd.wait_backend_state({CLOSED}, timeout=30) == CLOSED
            checked["Linux blkback"] = released_checked_from_dom0(xen, domid, json.loads(found.group(1)))
            acknowledge(xs, domid, LINUX_DEVID)

            with backend.sample_grant_maps() as sampler:
                found = guest.wait_for(released_line(OURS_DEVID), timeout=TIMEOUT)
            assert backend.wait_state(xs, {CLOSED}, timeout=30) == CLOSED
            assert sampler.peak > 0, "our blkback never mapped the domU's grants"
            assert backend.grant_maps() == 0, "our blkback still maps grants after Closed"
            checked["our blkback"] = released_checked_from_dom0(xen, domid, json.loads(found.group(1)))
            acknowledge(xs, domid, OURS_DEVID)

            guest.wait_for("GUEST: python exited 0", timeout=TIMEOUT)
            lines = guest_lines(guest.console())
            guest.destroy()
            assert domid not in [d for _, d in xl_domains()]
            destroy_vbd(xs, paths)  # our blkback tears the device down and exits
            backend.wait_exit()
            backend.exited_cleanly()
            report = backend.report()
    assert xl_domains() == [("Domain-0", 0)]

    shown = {}
    for name, devid in (("Linux blkback", LINUX_DEVID), ("our blkback", OURS_DEVID)):
        info, stats, released = check_frontend(lines, devid, queues=2)
        shown[name] = (f"ring order {info['ring_page_order']}, {info['num_queues']} queues, "
                       f"{info['segments_per_request']} segments, persistent {info['persistent']}; "
                       f"{stats['direct_requests']} direct + {stats['indirect_requests']} indirect requests; "
                       f"{len(released['refs'])} refs and {len(released['ports'])} ports released; "
                       f"Xen after close: {checked[name]}")
    with capsys.disabled():
        print(f"\ndomU {cfg.name}: {guest.timings}")
        for name, text in shown.items():
            print(f"domU blkfront on {name}: {text}")
        ours = report["frontends"].get(paths.frontend, {})
        print(f"our blkback's report for the domU's blkfront: violations {ours.get('violations')}, "
              f"requests {json.dumps(ours.get('requests', {}).get('by_operation'), sort_keys=True)}")

    for disk, seed in ((linux_disk, SEED), (our_disk, SEED + 1)):
        for offset, data in plan_writes(seed, DISK_SIZE):
            disk.model[offset : offset + len(data)] = data
        disk.assert_file_matches()
    # Our backend judged our frontend from another domain: every request passed every check.
    ours = report["frontends"][paths.frontend]
    assert report["total"] == 0 and ours["violations"] == {} and ours["requests"]["rejected"] == 0, report
    assert ours["connects"] == 1 and ours["disconnects"] == 1, ours
    ops = ours["requests"]["by_operation"]
    assert ops["read"]["indirect"] > 0 and ops["write"]["direct"] > 0, ops
    assert ours["features"]["persistent"] is True and ours["features"]["queues"] == 2, ours


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
