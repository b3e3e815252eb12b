"""The frontend test kit on real Xen: Linux's PV blkfront (Debian's 6.1 kernel, dom0's own)
against our misbehaving blkback (`image boot-test --fault-matrix`) and against backend
configurations (`--config-matrix`), each matrix one `xentools image boot-test` process run
in dom0, one guest boot per row ("banner" guest of tests/xen/guests.py: it reads its disk's
partition table and ext2 file system, then prints a login prompt).

Owns: which rows run (`make test`: a fixed representative subset, FAULTS_CI and
CONFIGS_CI; `make fault-matrix`, env XENTOOLS_FAULT_MATRIX=full: every fault kind and the
default pairwise configuration matrix), what Linux 6.1's hardened blkfront is known to do
(its messages, drivers/block/xen-blkfront.c of 6.1, as the strings of dom0's
xen-blkfront.ko show them: "response has incorrect id", "response references no pending
request", "response has wrong operation", "illegal number of responses", each followed by
"<disk> disabled for further use"; no oops), and printing both tables with their times.
Must not: define guests or start Xen services (guests.py, tests/nested/dom0/boot.sh do).

Run alone: .venv/bin/python tests/nested/run.py -- .venv/bin/python -m pytest -q -s tests/xen/test_fault_matrix.py
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from guests import (
    build_initramfs,
    guest_extra,
    guest_kernel,
    make_disk_image,
    record_rerun,
    unique_name,
    xl_domains,
)
from hvm_images import boot_test, pv_options, results_root

from xentools.devices.blkback_faults import KINDS

FULL = os.environ.get("XENTOOLS_FAULT_MATRIX") == "full"
# A representative quarter of the kinds for `make test` (~20 s a boot in dom0): the four Linux
# 6.1 reacts to with a documented message, and a status outside blkif's. The rest run in
# `make fault-matrix` (a backend that never answers costs the idle timeout, an absurd size the
# guest's wait for its disk); five rows, not more, keep `make test` under 20 minutes.
FAULTS_CI = ("unknown-id", "duplicate", "wrong-op", "rsp-overrun", "bad-status")
# Two configurations at the opposite extremes of each knob (the default matrix is pairwise).
CONFIGS_CI = [
    {"ring_order": 0, "indirect": 0, "persistent": False, "queues": 1, "sector_size": 512, "discard": False,
     "read_only": True},
    {"ring_order": 4, "indirect": 4096, "persistent": True, "queues": 4, "sector_size": 4096, "discard": True,
     "read_only": False},
]
# Linux 6.1 xen-blkfront's messages for a response it refuses (then "<disk> disabled for
# further use"), by fault kind.
LINUX_BROKEN = {
    "unknown-id": "response has incorrect id",
    "duplicate": "response references no pending request",
    "wrong-op": "response has wrong operation",
    "rsp-overrun": "illegal number of responses",
}
# Seconds. The guest waits GUEST_DISK_WAIT for its disk, then prints FAIL and powers off;
# the idle timeout (no console output) is longer, so a guest that waits is not a hang.
GUEST_DISK_WAIT = 15
IDLE_TIMEOUT = 40
BOOT_TIMEOUT = 150
FIRST_OUTPUT_TIMEOUT = 90
ROW_TIMEOUT = 420  # one row at most: blkback start (<= 120) + boot (<= 150) + xl and stop


def _run_matrix(kind: str, root: Path, image: Path, kernel, initramfs: Path, rows: list[str],
                count: int) -> dict:
    """Run one matrix CLI, once: a crash of our CLI fails the test (never run again)."""
    extra = guest_extra("banner", timeout=GUEST_DISK_WAIT)
    name = unique_name("xtfm")
    out = root / f"{kind}-{name}"
    if kind == "fault-matrix":
        matrix = ["--read-only", "--fault-matrix", *(a for spec in rows for a in ("--fault", spec))]
    else:
        matrix = ["--config-matrix", *rows]
    proc = boot_test(kind, image, out, name, *pv_options(kernel.image, initramfs, extra),
                     "--first-output-timeout", str(FIRST_OUTPUT_TIMEOUT), "--timeout", str(BOOT_TIMEOUT),
                     "--idle-timeout", str(IDLE_TIMEOUT), *matrix, timeout=ROW_TIMEOUT * count)
    seconds = proc.seconds
    assert proc.returncode in (0, 4, 5), f"{kind} exited {proc.returncode}\nstdout {proc.stdout[-3000:]}\n" \
                                         f"stderr {proc.stderr[-3000:]}"
    table = json.loads(proc.stdout)
    assert table == json.loads((out / "matrix.json").read_text())
    return {"table": table, "junit": ET.parse(out / "matrix-junit.xml").getroot(), "seconds": seconds,
            "returncode": proc.returncode, "stderr": proc.stderr, "out": out}


# A row the test could not judge because dom0's `xl` hung or crashed (under nested TCG, dom0
# processes now and then stall or die for no reason of theirs; xen-in-qemu.md).
XL_BROKE = re.compile(r"boottest\.xl_timeout|boottest\.xl_failed: xl \S+ failed \(exit -\d+\)")


def _rerun_xl_failures(kind: str, run: dict, root: Path, image: Path, kernel, initramfs: Path, work: Path) -> None:
    """Run once more, alone, each row whose boot `xl` itself failed (recorded, printed in the
    summary), and put its new row and test case in place of the old."""
    table, suite = run["table"], run["junit"].find("testsuite")
    cases = suite.findall("testcase")
    for index, row in enumerate(table["rows"]):
        if row["verdict"] != "error" or not XL_BROKE.search(row["reason"]):
            continue
        record_rerun(f"{kind} row {row['name']}: {row['reason'][:200]}")
        if kind == "fault-matrix":
            rows = [row["fault"]]
        else:
            again = work / f"rerun-{index}.json"
            again.write_text(json.dumps([row["offered"]]))
            rows = [str(again)]
        alone = _run_matrix(kind, root, image, kernel, initramfs, rows, 1)
        table["rows"][index] = alone["table"]["rows"][0]
        suite.remove(cases[index])
        suite.insert(list(suite).index(cases[index + 1]) if index + 1 < len(cases) else len(suite),
                     alone["junit"].find("testsuite/testcase"))
        cases = suite.findall("testcase")
        run["seconds"] += alone["seconds"]
    table["counts"] = {v: sum(r["verdict"] == v for r in table["rows"]) for v in ("pass", "fail", "error")}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def matrices(tmp_path_factory):
    if not Path("/proc/xen/capabilities").exists():
        pytest.fail("tests/xen runs only in dom0 on real Xen: run it through make test-xen", pytrace=False)
    work = tmp_path_factory.mktemp("fault-matrix-work")
    kernel = guest_kernel()
    initramfs = build_initramfs(work / "initramfs.cpio", kernel=kernel, scenarios=("banner",))
    disk = make_disk_image(work / "banner.raw", {"motd": b"xentools fault matrix\n"})
    before = _sha(disk.path)
    root = results_root(tmp_path_factory, "fault-matrix")
    faults = [] if FULL else list(FAULTS_CI)  # none given: the CLI's one row per kind
    configs: list[str] = []
    if not FULL:
        config_file = work / "configs.json"
        config_file.write_text(json.dumps(CONFIGS_CI))
        configs = [str(config_file)]
    fault_run = _run_matrix("fault-matrix", root, disk.path, kernel, initramfs, faults, len(faults or KINDS))
    config_run = _run_matrix("config-matrix", root, disk.path, kernel, initramfs, configs, 12)
    _rerun_xl_failures("fault-matrix", fault_run, root, disk.path, kernel, initramfs, work)
    _rerun_xl_failures("config-matrix", config_run, root, disk.path, kernel, initramfs, work)
    return {"fault": fault_run, "config": config_run, "image_before": before, "image_after": _sha(disk.path),
            "kernel": kernel, "domains": xl_domains()}


def _print_table(run: dict, title: str) -> None:
    table = run["table"]
    print(f"\n{title}: {table['counts']} in {run['seconds']:.1f} s "
          f"({run['seconds'] / max(1, len(table['rows'])):.1f} s per boot)")
    for row in table["rows"]:
        row = dict(row)
        row.pop("out_dir", None)
        print("  " + json.dumps(row, sort_keys=True))


def test_fault_matrix_linux_blkfront(matrices, capsys):
    run = matrices["fault"]
    rows = {row["name"].partition(":")[0]: row for row in run["table"]["rows"]}
    with capsys.disabled():
        _print_table(run, f"fault matrix, Linux {matrices['kernel'].version} xen-blkfront")
    expected = set(KINDS) if FULL else set(FAULTS_CI)
    assert set(rows) == expected
    for kind, row in rows.items():
        # Every fault fired (a row that tested nothing is an error) and the guest was judged.
        assert row["verdict"] in ("pass", "fail") and row["fired"] >= 1, row
        assert row["reaction"] in ("crash", "device-broken", "io-error", "hang", "nothing"), row
    for kind, words in LINUX_BROKEN.items():
        if kind in rows:
            row = rows[kind]
            assert row["reaction"] == "device-broken" and row["verdict"] == "pass", row
            lines = row["evidence"]["device-broken"]
            assert any(words in line for line in lines) and any("disabled for further use" in line
                                                                for line in lines), row
            assert "crash" not in row["reactions"], row
    cases = run["junit"].find("testsuite").findall("testcase")
    assert [c.get("name") for c in cases] == [row["name"] for row in run["table"]["rows"]]
    for case, row in zip(cases, run["table"]["rows"]):
        props = {p.get("name"): p.get("value") for p in case.find("properties")}
        assert props["reaction"] == row["reaction"] and props["fault"] == row["fault"]
        assert (case.find("failure") is not None) == (row["verdict"] == "fail")
    assert matrices["image_after"] == matrices["image_before"]  # a fault never writes the image


def test_config_matrix_linux_blkfront(matrices, capsys):
    run = matrices["config"]
    rows = run["table"]["rows"]
    with capsys.disabled():
        _print_table(run, f"configuration matrix, Linux {matrices['kernel'].version} xen-blkfront")
    assert len(rows) == (len(CONFIGS_CI) if not FULL else len(rows)) and len(rows) >= 2
    for row in rows:
        assert row["verdict"] == "pass" and run["returncode"] == 0, row
        negotiated, offered = row["negotiated"], row["offered"]
        # What Linux took is within what we offered, and it read its disk.
        assert negotiated["ring-page-order"] <= offered["ring_order"], row
        assert 1 <= negotiated["queues"] <= offered["queues"], row
        if not offered["persistent"]:
            assert negotiated["persistent"] is False, row
        assert negotiated["read-only"] is offered["read_only"], row
        assert negotiated["max-indirect-segments"] == offered["indirect"], row
        assert row["requests"].get("read", 0) > 0 and row["violations"] == {}, row
    assert matrices["image_after"] == matrices["image_before"]  # the guest mounts read-only


def test_every_guest_is_gone(matrices):
    names = [name for name, _ in matrices["domains"]]
    assert not [n for n in names if n.startswith("xtfm")], names
