"""The frontend test kit of `image boot-test`: the guest's reaction read from its console,
the fault section and its verdict, the pairwise configuration matrix, the matrices' table
(JSON, JUnit), and the CLI's checks, driven by a fake `xl` and a fake blkback process (the
real ones run in tests/xen/test_fault_matrix.py)."""

from __future__ import annotations

import functools
import itertools
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from test_images_support import FakeXl, freebsd_like_image
from xentools.devices.blkback_faults import KINDS
from xentools.tools.image_cmd import image as image_group
from xentools.tools.images import boottest as boottest_module
from xentools.tools.images.errors import BootTestError
from xentools.tools.images.matrix import (
    CONFIG_KNOBS,
    ConfigRow,
    classify_reaction,
    config_rows,
    fault_section,
    matrix_faults,
    pairwise,
)
from xentools.tools.images.verdict import Decision, Verdict

# Linux 6.1 xen-blkfront's own lines (the format strings of its xen-blkfront.ko), as a
# guest's console shows them.
LINUX_BAD_ID = "[    2.104511] xvda: response has incorrect id (9223372036854775808)"
LINUX_DISABLED = "[    2.104530] xvda disabled for further use"
LINUX_IO = "[    2.201000] I/O error, dev xvda, sector 0 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 2"
OOPS = "[    3.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008"


def decision(verdict: Verdict, line: str | None = None, reason: str = "r") -> Decision:
    return Decision(verdict=verdict, reason=reason, line=line, line_no=None, pattern=None, elapsed=1.0)


@pytest.mark.parametrize("console,verdict,kind,seen", [
    (f"boot\n{LINUX_BAD_ID}\n{LINUX_DISABLED}\nGUEST: FAIL no /dev/xvda1 after 15 s\n", Verdict.ENDED,
     "device-broken", ("device-broken", "io-error")),
    (f"boot\n{LINUX_IO}\nxentools-guest login: \n", Verdict.PASS, "io-error", ("io-error",)),
    (f"boot\n{LINUX_DISABLED}\n{OOPS}\nCall Trace:\n", Verdict.TIMEOUT, "crash", ("crash", "device-broken", "hang")),
    ("boot\nKernel panic - not syncing: VFS\n", Verdict.PANIC, "crash", ("crash",)),
    ("boot\nwaiting\n", Verdict.TIMEOUT, "hang", ("hang",)),
    ("boot\nxentools-guest login: \n", Verdict.PASS, "nothing", ()),
    ("", Verdict.ERROR, "error", ()),
], ids=["broken", "io-error", "crash-first", "panic", "hang", "nothing", "error"])
def test_the_reaction_is_read_from_the_console(console, verdict, kind, seen) -> None:
    reaction = classify_reaction(console, decision(verdict, reason="no output for 40 s"))
    assert reaction.kind == kind and reaction.seen == seen
    if kind == "device-broken":
        assert reaction.evidence["device-broken"] == (LINUX_BAD_ID.strip(), LINUX_DISABLED.strip())
    if kind == "hang":
        assert reaction.first_line() == "no output for 40 s"


def _conformance(fired: int) -> dict:
    return {"faults": [{"kind": "unknown-id", "spec": "unknown-id", "fired": fired, "first": {"request": 1}}]}


@pytest.mark.parametrize("console,verdict,fired,expected", [
    (f"{LINUX_BAD_ID}\n{LINUX_DISABLED}\n", Verdict.ENDED, 1, "pass"),
    ("xentools-guest login: \n", Verdict.PASS, 1, "pass"),
    (OOPS + "\n", Verdict.TIMEOUT, 1, "fail"),
    ("quiet\n", Verdict.TIMEOUT, 1, "fail"),
    ("xentools-guest login: \n", Verdict.PASS, 0, "error"),
    ("", Verdict.ERROR, 1, "error"),
], ids=["noticed", "nothing", "crash", "hang", "never-fired", "boot-error"])
def test_the_fault_verdict(console, verdict, fired, expected) -> None:
    d = decision(verdict)
    section = fault_section(["unknown-id"], _conformance(fired), classify_reaction(console, d), d)
    assert section["verdict"] == expected and section["fired"] == fired and section["specs"] == ["unknown-id"]
    assert "\n" not in section["reason"]


def test_a_missing_blkback_report_is_an_error() -> None:
    d = decision(Verdict.PASS)
    assert fault_section(["silent"], None, classify_reaction("", d), d)["verdict"] == "error"


def test_the_fault_matrix_has_one_row_per_kind_and_a_late_answer_shorter_than_the_idle_timeout() -> None:
    specs = matrix_faults(KINDS, late_delay=5)
    assert [s.partition(":")[0] for s in specs] == list(KINDS)
    assert "late:delay=5" in specs and "unknown-id" in specs


def test_the_default_configurations_cover_every_pair_of_values() -> None:
    rows = config_rows()
    assert rows == config_rows()  # deterministic
    product = 1
    for values in CONFIG_KNOBS.values():
        product *= len(values)
    assert 8 <= len(rows) <= 12 < product  # indirect's 4 values x any 2-valued knob need 8
    for a, b in itertools.combinations(CONFIG_KNOBS, 2):
        for va, vb in itertools.product(CONFIG_KNOBS[a], CONFIG_KNOBS[b]):
            assert any(r.values[a] == va and r.values[b] == vb for r in rows), (a, va, b, vb)
    assert pairwise({"x": (1, 2), "y": (3,)}) == [{"x": 1, "y": 3}, {"x": 2, "y": 3}]


def test_a_configuration_row_becomes_blkback_options() -> None:
    row = ConfigRow({"ring_order": 0, "indirect": 32, "persistent": False, "queues": 1, "sector_size": 4096,
                     "discard": False, "read_only": True})
    assert row.blkback_options() == ["--max-ring-page-order", "0", "--max-indirect-segments", "32",
                                     "--max-queues", "1", "--sector-size", "4096", "--no-persistent", "--no-discard"]
    assert row.name == "order0-ind32-nopers-q1-4096-nodisc-ro"


def test_a_configuration_file_gives_rows_over_the_defaults(tmp_path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"ring_order": 0}, {"queues": 2, "read_only": True}]))
    rows = config_rows(str(path))
    assert [r.values["ring_order"] for r in rows] == [0, 4]
    assert rows[1].values["queues"] == 2 and rows[1].values["read_only"] is True and rows[1].values["indirect"] == 256


@pytest.mark.parametrize("text,words", [
    ("{", "is not JSON"),
    ("[]", "non-empty JSON list"),
    ("[1]", "row 1 is not an object"),
    ('[{"ring": 1}]', "unknown knob 'ring'"),
    ('[{"indirect": 5000}]', "indirect 5000 is not one of 0..4096"),
    ('[{"sector_size": 513}]', "sector_size 513 is not one of 512, 1024, 2048, 4096"),
    ('[{"persistent": 1}]', "persistent must be true or false"),
    ('[{"queues": true}]', "queues True is not one of 1..64"),
])
def test_bad_configuration_files_are_one_line(tmp_path, text, words) -> None:
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(BootTestError) as err:
        config_rows(str(path))
    assert words in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------- the CLI, with fakes

# A blkback that writes, when stopped, a conformance report as ours would: the faults it
# was given (each fired once), the frontend's features from its options, three reads.
FAKE_BLKBACK = r'''
import json, signal, sys, time
argv = sys.argv[1:]
def opt(name, default):
    return argv[argv.index(name) + 1] if name in argv else default
faults = [argv[i + 1] for i, a in enumerate(argv) if a == "--fault"]
report = opt("--report", None)
def stop(*_):
    features = {"ring-page-order": min(int(opt("--max-ring-page-order", "4")), 2),
                "queues": min(int(opt("--max-queues", "4")), 2), "persistent": "--no-persistent" not in argv,
                "max-indirect-segments": int(opt("--max-indirect-segments", "256")),
                "sector-size": 512, "discard": "--no-discard" not in argv, "read-only": "--read-only" in argv}
    json.dump({"backend": opt("--backend-path", ""), "total": 0, "requests": 3, "argv": argv,
               "frontends": {"/f": {"connects": 1, "features": features, "violations": {},
                                    "requests": {"by_operation": {"read": {"direct": 2, "indirect": 1}}}}},
               "faults": [{"kind": f.partition(":")[0], "spec": f, "fired": 1, "first": {"request": 1}}
                          for f in faults]}, open(report, "w"))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(0.02)
'''
BROKEN_BOOT = f"Linux version 6.1\n{LINUX_BAD_ID}\n{LINUX_DISABLED}\nGUEST: FAIL no /dev/xvda1 after 15 s\n"


@pytest.fixture
def kit(tmp_path, monkeypatch):
    """Fake xl on PATH, root, and boot-test's XentoolsDisk with a fake xenstore and blkback."""
    fake = FakeXl(tmp_path)
    monkeypatch.setenv("FAKE_XL_STATE", str(fake.state))
    monkeypatch.setenv("PATH", fake.env()["PATH"])
    monkeypatch.setattr("os.geteuid", lambda: 0)
    script = tmp_path / "fake_blkback.py"
    script.write_text(FAKE_BLKBACK)

    class Xs:
        def read(self, path):
            return b"2"

        def close(self):
            pass

    def argv(backend, image, report, *, read_only, options):
        return [sys.executable, str(script), *boottest_module.default_blkback_argv(
            backend, image, report, read_only=read_only, options=options)[5:]]

    disk = functools.partial(
        boottest_module.XentoolsDisk, connect=Xs, exit_grace=0.05, poll=0.01, blkback_argv=argv,
        create_vbd=lambda xs, **kw: SimpleNamespace(backend=f"/local/domain/0/backend/xtvbd/7/{kw['devid']}"),
        destroy_vbd=lambda xs, paths: None)
    monkeypatch.setattr("xentools.tools.image_cmd.XentoolsDisk", disk)
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(freebsd_like_image(1 << 20)))
    return SimpleNamespace(fake=fake, image=image, out=tmp_path / "res")


def cli(kit, *args):
    return CliRunner().invoke(image_group, ["boot-test", str(kit.image), "--out", str(kit.out), "--name", "xtfm",
                                            "--backend", "xentools", "--prompt-grace", "0.1", *args],
                              catch_exceptions=False)


def test_an_unknown_fault_is_one_line_with_the_kinds_and_exit_2_before_anything_runs(kit) -> None:
    r = cli(kit, "--fault", "unknown-id", "--fault", "nonsense:after=1")
    assert r.exit_code == 2 and r.stdout == ""
    line, = r.stderr.strip().splitlines()
    assert "unknown kind 'nonsense'" in line and "valid kinds: unknown-id, duplicate" in line and "huge-sectors" in line
    assert kit.fake.calls() == [] and not kit.out.exists()


@pytest.mark.parametrize("args,words", [
    (["--fault", "silent:p=2"], "p=2 is outside 0..1"),
    (["--fault", "silent:after=0"], "the count must be at least 1"),
    (["--fault-matrix", "--backend", "host"], "--fault-matrix needs --backend xentools"),
    (["--config-matrix", "--fault", "silent"], "--config-matrix boots an honest backend: drop --fault"),
])
def test_kit_options_that_cannot_work_are_one_line_and_exit_2(kit, args, words) -> None:
    r = cli(kit, *args)
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert kit.fake.calls() == []


def test_a_bad_configuration_file_is_refused_before_anything_runs(kit, tmp_path) -> None:
    (tmp_path / "m.json").write_text('[{"indirect": 7000}]')
    r = cli(kit, "--config-matrix", str(tmp_path / "m.json"))
    assert r.exit_code == 2 and "indirect 7000" in r.stderr and kit.fake.calls() == []


def test_one_fault_gives_the_report_a_fault_section_and_its_verdict(kit) -> None:
    kit.fake.configure(transcript=[[0.02, BROKEN_BOOT]], hold=False)  # the guest powers off
    r = cli(kit, "--kernel", str(kit.image), "--type", "pv", "--fault", "unknown-id:every=3,on=read")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("pass: fault unknown-id:every=3,on=read: the guest survived; device-broken: ")
    report = json.loads((kit.out / "report.json").read_text())
    fault = report["fault"]
    assert (fault["verdict"], fault["reaction"], fault["fired"]) == ("pass", "device-broken", 1)
    assert fault["reactions"] == ["device-broken", "io-error"] and report["verdict"] == "ended"
    argv = report["disk_backend_report"]["conformance"]["argv"]
    assert argv[argv.index("--fault") + 1] == "unknown-id:every=3,on=read"
    suite = ET.parse(kit.out / "junit.xml").getroot().find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert (props["fault"], props["reaction"]) == ("unknown-id:every=3,on=read", "device-broken")
    assert suite.get("failures") == "0" and suite.find("testcase/failure") is None


def test_a_guest_that_hangs_under_a_fault_fails_and_says_so(kit) -> None:
    kit.fake.configure(transcript=[[0.02, "Linux version 6.1\nwaiting for xvda\n"]])
    r = cli(kit, "--kernel", str(kit.image), "--type", "pv", "--fault", "silent", "--idle-timeout", "0.5")
    assert r.exit_code == 5 and r.stdout.startswith("fail: fault silent: the guest hung: ")
    suite = ET.parse(kit.out / "junit.xml").getroot().find("testsuite")
    failure = suite.find("testcase/failure")
    assert failure.get("type") == "hang" and "fault silent" in failure.get("message")


def test_the_fault_matrix_boots_once_per_fault_and_writes_one_table(kit) -> None:
    kit.fake.configure(transcript=[[0.02, BROKEN_BOOT]], hold=False)
    specs = ["unknown-id", "wrong-op:on=read", "keep-mapped"]
    r = cli(kit, "--kernel", str(kit.image), "--type", "pv", "--fault-matrix", "--json",
            *(a for s in specs for a in ("--fault", s)))
    assert r.exit_code == 0, r.stderr
    table = json.loads(r.stdout)
    assert table == json.loads((kit.out / "matrix.json").read_text())
    assert table["counts"] == {"pass": 3, "fail": 0, "error": 0}
    assert [row["fault"] for row in table["rows"]] == specs
    for index, row in enumerate(table["rows"], 1):
        assert (row["verdict"], row["reaction"], row["fired"], row["first_request"]) == (
            "pass", "device-broken", 1, 1)
        assert Path(row["out_dir"]).name == f"{index:02d}-{specs[index - 1].partition(':')[0]}"
        report = json.loads((Path(row["out_dir"]) / "report.json").read_text())
        assert report["name"] == f"xtfm-{index:02d}" and report["fault"]["specs"] == [specs[index - 1]]
        argv = report["disk_backend_report"]["conformance"]["argv"]
        assert ("--no-persistent" in argv) is (index == 3)  # keep-mapped needs per-request mappings
    cases = ET.parse(kit.out / "matrix-junit.xml").getroot().find("testsuite").findall("testcase")
    assert [c.get("name") for c in cases] == specs
    assert all(c.find("failure") is None and c.find("error") is None for c in cases)
    assert len(kit.fake.live_domains()) == 0
    assert [c[0] for c in kit.fake.calls()].count("create") == 3


def test_the_configuration_matrix_shows_what_was_negotiated(kit, tmp_path) -> None:
    kit.fake.configure(transcript=[[0.02, "Linux version 6.1\nxentools-guest login: \n"]])
    (tmp_path / "m.json").write_text(json.dumps([
        {"ring_order": 0, "indirect": 0, "persistent": False, "queues": 1, "discard": False, "read_only": True},
        {"indirect": 4096, "sector_size": 4096},
    ]))
    r = cli(kit, "--kernel", str(kit.image), "--type", "pv", "--config-matrix", str(tmp_path / "m.json"))
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("pass ") for line in lines)
    assert "ring-page-order=0 queues=1 persistent=False max-indirect-segments=0" in lines[0]
    assert "requests[read=3]" in lines[0] and "violations=0" in lines[0]
    rows = json.loads((kit.out / "matrix.json").read_text())["rows"]
    assert rows[0]["negotiated"]["read-only"] is True and rows[1]["negotiated"]["read-only"] is False
    assert rows[1]["offered"]["sector_size"] == 4096 and rows[1]["requests"] == {"read": 3}
    argv = json.loads((Path(rows[1]["out_dir"]) / "blkback-report.json").read_text())["argv"]
    assert argv[argv.index("--sector-size") + 1] == "4096" and argv[argv.index("--max-indirect-segments") + 1] == "4096"
    suite = ET.parse(kit.out / "matrix-junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "0", "0")


def test_a_fault_boot_ends_soon_after_the_frontend_gave_its_disk_up(kit, monkeypatch) -> None:
    monkeypatch.setattr(boottest_module, "FAULT_SETTLE", 0.3)
    kit.fake.configure(transcript=[[0.02, f"Linux version 6.1\n{LINUX_BAD_ID}\n{LINUX_DISABLED}\n"]])  # then quiet
    r = cli(kit, "--kernel", str(kit.image), "--type", "pv", "--fault", "unknown-id", "--idle-timeout", "60")
    assert r.exit_code == 0, r.stderr
    report = json.loads((kit.out / "report.json").read_text())
    assert report["verdict"] == "ended" and "gave its disk up 0.3 s before" in report["reason"]
    assert report["elapsed_s"] < 10 and report["fault"]["reactions"] == ["device-broken"]
