"""The boot-test engine driven by a fake `xl` (a script that simulates create -p, domid,
console, unpause, destroy and xenconsoled's guest log): verdicts, files, and the guest
always destroyed."""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from test_images_support import FakeXl, freebsd_like_image, vhd_footer
from xentools.tools.image_cmd import image as image_group
from xentools.tools.images.boottest import (
    BootTest,
    DiskServer,
    HostDisk,
    HostResources,
    XentoolsDisk,
    default_blkback_argv,
    domain_name,
    domain_xen_lines,
    fit_guest,
    parse_xl_info,
    preflight,
)
from xentools.tools.images.catalog import load_catalog
from xentools.tools.images.errors import BootTestError, ImageFormatError
from xentools.tools.images.verdict import Outcome, Rules, Verdict
from xentools.tools.images.xl import Completed, Console, GuestConfig, SubprocessRunner, parse_cfg_line, render_xl_cfg

CATALOG = load_catalog(Path(__file__).resolve().parents[1] / "vm-images" / "catalog.toml")
NAME = "xtbt-test-1"
BOOT = "Booting...\r\nCopyright (c) 1992-2024 The FreeBSD Project.\r\nxbd0: 2MB <Virtual Block Device>\r\n"
PANIC_LINE = "panic: Assertion nseg <= sc->xbd_max_indirectpages failed at blkfront.c:312"


def rules(**kw):
    opts = {"first_output_timeout": 5.0, "boot_timeout": 10.0, "prompt_grace": 0.2}
    opts.update(kw)
    return Rules.build(CATALOG.profile("default").patterns, **opts)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(freebsd_like_image(1 << 20)))
    return p


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = FakeXl(tmp_path)
    monkeypatch.setenv("FAKE_XL_STATE", str(f.state))
    return f


def boot(tmp_path, fake, image, *, r=None, disk=None, guest_type="hvm", log_dir=None, kernel=None, runner=None):
    disk = disk or HostDisk(str(image))
    guest = GuestConfig(name=NAME, guest_type=guest_type, memory_mb=256, vcpus=1, kernel=kernel,
                        disks=tuple(disk.xl_disks()))
    test = BootTest(image=str(image), image_format="raw", guest=guest, rules=r or rules(), disk=disk,
                    out_dir=tmp_path / "out", xl=str(fake.path), log_dir=log_dir, liveness_interval=0.05,
                    runner=runner)
    return test.run()


def commands(fake):
    return [c[0] for c in fake.calls()]


def test_pass_through_xl_console_on_a_pty(tmp_path, fake, image):
    fake.configure(transcript=[[0.05, BOOT], [0.05, "\r\nFreeBSD/amd64 (xen) (ttyu0)\r\n\r\nlogin: "]])
    res = boot(tmp_path, fake, image)
    assert res.decision.verdict is Verdict.PASS and res.decision.line == "login:"
    assert res.outcome is Outcome.PASS and res.exit_code == 0
    cmds = commands(fake)
    assert cmds[:2] == ["create", "domid"] and "console" in cmds and cmds[-1] == "destroy"
    assert cmds.index("create") < cmds.index("unpause") < cmds.index("destroy")
    assert fake.calls()[0] == ["create", "-p", str(tmp_path / "out" / "xl.cfg")]
    assert fake.live_domains() == []
    assert res.destroyed and res.cleanup_errors == () and res.domid == 7
    assert b"FreeBSD/amd64 (xen) (ttyu0)" in (tmp_path / "out" / "console.log").read_bytes()
    cfg = fake.last_cfg()
    assert "type = 'hvm'" in cfg and "serial = 'pty'" in cfg
    assert f"disk = [ 'format=raw,vdev=xvda,access=rw,target={image}' ]" in cfg


def test_panic_from_the_xenconsoled_log_is_quoted_in_every_report(tmp_path, fake, image):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / f"guest-{NAME}.log").write_bytes(b"an older run of the same name\npanic: old\n")
    fake.configure(log_dir=str(logs), transcript=[[0.05, BOOT], [0.05, PANIC_LINE + "\ncpuid = 0\nKDB: enter: panic\n"]])
    res = boot(tmp_path, fake, image, log_dir=str(logs))
    d = res.decision
    assert d.verdict is Verdict.PANIC and d.line == PANIC_LINE and d.line_no == 4
    assert res.exit_code == 5 and res.console_mode == "log"
    assert fake.live_domains() == [] and commands(fake)[-1] == "destroy"
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "panic" and report["outcome"] == "fail" and report["exit_code"] == 5
    assert report["matched_line"] == PANIC_LINE and report["matched_pattern"] == "(?:^|\\s)panic: "
    assert report["image"] == str(image) and report["backend"] == "host" and report["destroyed"] is True
    assert report["files"]["console_log"] == str(out / "console.log")
    assert report["timeouts_s"]["boot"] == 10.0
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1" and suite.get("errors") == "0" and suite.get("tests") == "1"
    case = suite.find("testcase")
    assert case.get("name") == "disk.raw" and case.get("classname") == "boot-test.default"
    failure = case.find("failure")
    assert failure.get("type") == "panic" and PANIC_LINE in failure.get("message")
    assert PANIC_LINE in case.find("system-out").text
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["verdict"] == "panic" and props["outcome"] == "fail"
    log = (out / "console.log").read_bytes()
    assert PANIC_LINE.encode() in log and b"an older run" not in log


def test_timeout_quotes_the_last_line_and_destroys(tmp_path, fake, image):
    fake.configure(transcript=[[0.02, "Booting...\nwaiting for something that never comes\n"]])
    res = boot(tmp_path, fake, image, r=rules(boot_timeout=3.0))  # output first, even on a loaded machine
    assert res.decision.verdict is Verdict.TIMEOUT and res.exit_code == 6
    assert res.decision.line == "waiting for something that never comes"
    assert fake.live_domains() == [] and commands(fake)[-1] == "destroy"
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot().find("testsuite")
    assert suite.find("testcase/failure").get("type") == "timeout"


def test_guest_that_never_prints(tmp_path, fake, image):
    fake.configure(transcript=[])
    res = boot(tmp_path, fake, image, r=rules(first_output_timeout=0.4))
    assert res.decision.verdict is Verdict.NO_OUTPUT and res.exit_code == 6
    assert "no output from the guest in 0.4 s" in res.decision.reason
    assert fake.live_domains() == []
    assert (tmp_path / "out" / "console.log").read_bytes() == b""


def test_mountroot_prompt(tmp_path, fake, image):
    fake.configure(transcript=[[0.02, BOOT + "Mounting from ufs:/dev/gpt/rootfs failed with error 19.\r\n\r\nmountroot> "]])
    res = boot(tmp_path, fake, image)
    assert res.decision.verdict is Verdict.MOUNTROOT and res.exit_code == 5
    assert res.decision.line == "Mounting from ufs:/dev/gpt/rootfs failed with error 19."


def test_guest_that_powers_off_without_a_verdict(tmp_path, fake, image):
    logs = tmp_path / "logs"
    logs.mkdir()
    fake.configure(log_dir=str(logs), hold=False, transcript=[[0.02, "Booting...\nUptime: 1s\n"]])
    res = boot(tmp_path, fake, image, log_dir=str(logs))
    assert res.decision.verdict is Verdict.ENDED and res.exit_code == 5
    assert "the domain is gone" in res.decision.reason and res.decision.line == "Uptime: 1s"
    assert res.destroyed and res.cleanup_errors == ()  # already gone counts as destroyed


class CrashingXlRunner(SubprocessRunner):
    """Every `xl domid` after the unpause crashes (SIGSEGV) once before it answers, as xl
    did in a nested dom0 under load."""

    def __init__(self):
        self.crashes = 0
        self._unpaused = False
        self._crash_next = True

    def run(self, argv, timeout):
        if argv[1] == "unpause":
            self._unpaused = True
        if argv[1] == "domid" and self._unpaused:
            self._crash_next = not self._crash_next
            if not self._crash_next:
                self.crashes += 1
                return Completed(-11, "", "")
        return super().run(argv, timeout)


def test_an_xl_that_crashes_is_asked_again_not_taken_for_a_gone_guest(tmp_path, fake, image):
    logs = tmp_path / "logs"
    logs.mkdir()
    fake.configure(log_dir=str(logs), transcript=[[0.3, "Booting...\n"], [0.3, "login: \n"]])
    runner = CrashingXlRunner()
    res = boot(tmp_path, fake, image, log_dir=str(logs), runner=runner)
    assert runner.crashes >= 2
    assert res.decision.verdict is Verdict.PASS, res.decision
    # Each repeat is in the report's notes.
    repeats = [n for n in res.notes if n.startswith("xl repeated: ")]
    assert len(repeats) == runner.crashes and "`xl domid xtbt-test-1` was killed by signal 11" in repeats[0]
    assert res.destroyed and fake.live_domains() == []


def test_failed_create_is_an_error_and_destroy_is_still_tried(tmp_path, fake, image):
    fake.configure(create_rc=3)
    res = boot(tmp_path, fake, image)
    assert res.decision.verdict is Verdict.ERROR and res.exit_code == 4
    assert "xl create failed (exit 3): libxl: error: fake create failure" in res.decision.reason
    assert commands(fake) == ["create", "destroy", "domid"]
    assert res.cleanup_errors == ()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["outcome"] == "error"
    assert ET.parse(tmp_path / "out" / "junit.xml").getroot().find("testsuite").get("errors") == "1"


def test_failed_unpause_still_destroys_the_guest(tmp_path, fake, image):
    fake.configure(unpause_rc=1)
    res = boot(tmp_path, fake, image)
    assert res.decision.verdict is Verdict.ERROR and "xl unpause failed" in res.decision.reason
    assert fake.live_domains() == [] and commands(fake)[-1] == "destroy" and res.destroyed


class BrokenDisk(DiskServer):
    kind = "broken"

    def __init__(self):
        self.stopped = False

    def xl_disks(self):
        return []

    def start(self, domid):
        raise BootTestError("boottest.blkback", "cannot start blkback: test")

    def stop(self):
        self.stopped = True
        return None


def test_backend_failure_still_destroys_and_stops(tmp_path, fake, image):
    disk = BrokenDisk()
    res = boot(tmp_path, fake, image, disk=disk, guest_type="pv", kernel=str(image))
    assert res.decision.verdict is Verdict.ERROR and "cannot start blkback" in res.decision.reason
    assert disk.stopped and fake.live_domains() == [] and commands(fake)[-1] == "destroy"


def test_a_guest_that_cannot_be_destroyed_turns_a_pass_into_an_error(tmp_path, fake, image):
    fake.configure(destroy_rc=1, transcript=[[0.02, "login: \n"]])
    res = boot(tmp_path, fake, image)
    assert res.decision.verdict is Verdict.PASS
    assert res.outcome is Outcome.ERROR and res.exit_code == 4
    assert "xl destroy xtbt-test-1 failed: libxl: error: fake destroy failure" in res.cleanup_errors[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["destroyed"] is False and report["outcome"] == "error"


class InterruptingRunner(SubprocessRunner):
    def spawn_console(self, argv):
        class Boom(Console):
            mode = "xl"

            def read(self, timeout):
                raise KeyboardInterrupt

            def close(self):
                pass

        return Boom()


def test_interrupt_still_destroys_the_guest(tmp_path, fake, image):
    fake.configure(transcript=[])
    with pytest.raises(KeyboardInterrupt):
        boot(tmp_path, fake, image, runner=InterruptingRunner())
    assert fake.live_domains() == [] and commands(fake)[-1] == "destroy"


BLKBACK = r'''
import json, signal, sys, time
report = sys.argv[sys.argv.index("--report") + 1]
def stop(*_):
    json.dump({"requests": 12, "violations": {}, "backend": sys.argv[sys.argv.index("--backend-path") + 1]},
              open(report, "w"))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("fake blkback serving", flush=True)
while True:
    time.sleep(0.05)
'''


def test_xentools_backend_writes_the_vbd_runs_blkback_and_collects_its_report(tmp_path, fake, image):
    script = tmp_path / "fake_blkback.py"
    script.write_text(BLKBACK)
    seen = SimpleNamespace(created=None, destroyed=None, closed=False, live_at_destroy=None)

    class Xs:
        def read(self, path):
            seen.state_read = path
            return b"2"  # what blkback writes once ready: InitWait

        def close(self):
            seen.closed = True

    def create_vbd(xs, **kw):
        seen.created = kw
        return SimpleNamespace(backend=f"/local/domain/0/backend/vbd/{kw['frontend_domid']}/{kw['devid']}",
                               frontend=f"/local/domain/{kw['frontend_domid']}/device/vbd/{kw['devid']}")

    def destroy_vbd(xs, paths):
        seen.destroyed = paths
        seen.live_at_destroy = fake.live_domains()

    report = tmp_path / "out" / "blkback-report.json"
    disk = XentoolsDisk(str(image), report_path=str(report), connect=Xs, create_vbd=create_vbd,
                        destroy_vbd=destroy_vbd, exit_grace=0.2,  # this fake ignores its vbd's removal
                        blkback_argv=lambda backend, img, rep, read_only, options: [
                            sys.executable, str(script), "--backend-path", backend, "--image", img, "--report", rep,
                            *(["--read-only"] if read_only else [])])
    fake.configure(transcript=[[0.3, "[    0.5] blkfront: xvda: flush diskcache: enabled\nlogin: \n"]])
    res = boot(tmp_path, fake, image, disk=disk, guest_type="pv", kernel=str(image))
    assert res.decision.verdict is Verdict.PASS and res.backend == "xentools"
    assert seen.created == {"backend_domid": 0, "frontend_domid": 7, "devid": 51712, "params": str(image), "mode": "w",
                            "backend_kind": "xtvbd"}  # not backend/vbd/, which dom0's xen-blkback claims
    assert seen.destroyed.backend == "/local/domain/0/backend/vbd/7/51712"
    assert seen.live_at_destroy == [] and seen.closed  # the vbd goes after the guest
    assert seen.state_read == "/local/domain/0/backend/vbd/7/51712/state"  # waited for InitWait
    assert res.disk_report["blkback_exit_code"] == 0 and res.disk_report["errors"] == []
    assert res.disk_report["ready_after_s"] >= 0
    phases = json.loads((tmp_path / "out" / "report.json").read_text())["phases_s"]
    assert list(phases) == ["create", "disk_start", "unpause", "guest", "destroy", "disk_stop"]
    assert phases["guest"] > 0.1 and phases["disk_stop"] >= 0.2  # the transcript (0.3 s); the exit grace
    assert Path(res.disk_report["log_file"]).read_text() == "fake blkback serving\n"
    assert res.disk_report["conformance"] == {"requests": 12, "violations": {},
                                              "backend": "/local/domain/0/backend/vbd/7/51712"}
    cfg = fake.last_cfg()
    assert "disk = [  ]" in cfg and f"kernel = '{image}'" in cfg and "serial" not in cfg
    assert json.loads((tmp_path / "out" / "report.json").read_text())["disk_backend_report"]["conformance"]["requests"] == 12


def _dying_disk(tmp_path, code, *, state=b"2"):
    """A XentoolsDisk whose blkback prints a line and exits `code` (at once, or after 0.5 s)."""
    script = tmp_path / "dying_blkback.py"
    script.write_text(f"import sys, time\nprint('blkback: error: fake failure', flush=True)\n"
                      f"time.sleep({0.5 if state else 0})\nsys.exit({code})\n")

    class Xs:
        def read(self, path):
            return state

        def close(self):
            pass

    return XentoolsDisk(str(tmp_path / "disk.raw"), report_path=str(tmp_path / "out" / "blkback-report.json"),
                        connect=Xs, create_vbd=lambda xs, **kw: SimpleNamespace(backend="/b/7/51712", frontend="/f"),
                        destroy_vbd=lambda xs, paths: None, exit_grace=5.0, ready_timeout=5.0, poll=0.02,
                        blkback_argv=lambda *a, **kw: [sys.executable, str(script)])


def test_a_blkback_that_never_gets_ready_is_an_error_and_the_guest_still_goes(tmp_path, fake, image):
    disk = _dying_disk(tmp_path, 3, state=None)
    fake.configure(transcript=[[0.02, "login: \n"]])
    res = boot(tmp_path, fake, image, disk=disk, guest_type="pv", kernel=str(image))
    assert res.decision.verdict is Verdict.ERROR and res.exit_code == 4
    assert "blkback exited 3 (blkback: error: fake failure)" in res.decision.reason
    assert "before it served the disk" in res.decision.reason
    assert "unpause" not in commands(fake) and fake.live_domains() == [] and commands(fake)[-1] == "destroy"
    assert list(res.phases) == ["create", "until_error", "destroy", "disk_stop"]
    assert "blkback exited 3: blkback: error: fake failure" in res.disk_report["errors"]


def test_a_blkback_that_crashes_while_the_guest_runs_is_an_error(tmp_path, fake, image):
    disk = _dying_disk(tmp_path, -11 % 256)
    fake.configure(transcript=[[0.02, "Booting...\n"]])  # then waits for its disk, forever
    res = boot(tmp_path, fake, image, disk=disk, guest_type="pv", kernel=str(image))
    assert res.decision.verdict is Verdict.ERROR and res.exit_code == 4
    assert res.decision.reason.startswith("blkback exited 245 (blkback: error: fake failure)")
    assert fake.live_domains() == [] and commands(fake)[-1] == "destroy"
    assert res.disk_report["blkback_exit_code"] == 245


def test_default_blkback_command_line():
    argv = default_blkback_argv("/local/domain/0/backend/vbd/7/51712", "/i.raw", "/o/r.json", read_only=True)
    assert argv[1:] == ["-m", "xentools", "blkback", "serve", "--backend-path", "/local/domain/0/backend/vbd/7/51712",
                        "--image", "/i.raw", "--report", "/o/r.json", "--read-only"]
    assert "--read-only" not in default_blkback_argv("/b", "/i", "/r")
    assert default_blkback_argv("/b", "/i", "/r", options=["--fault", "silent", "--no-discard"])[-3:] == [
        "--fault", "silent", "--no-discard"]


def test_xentools_backend_gives_an_hvm_guests_firmware_the_image_through_qemu(tmp_path, image):
    # No disk= line (the PV path is our blkback's alone); QEMU gets the image for the firmware.
    disk = XentoolsDisk(str(image), report_path=str(tmp_path / "r.json"), writable=False)
    assert disk.xl_disks() == []
    ahci = disk.device_model_args("ahci")
    assert ahci == ["-device", "ahci,id=xtahci0", "-drive", f"file={image},if=none,id=xtdisk0,format=raw,snapshot=on",
                    "-device", "ide-hd,bus=xtahci0.0,unit=0,drive=xtdisk0"]
    assert disk.device_model_args("ide")[-1] == "ide-hd,bus=ide.0,unit=0,drive=xtdisk0"
    cfg = render_xl_cfg(GuestConfig(NAME, "hvm", 256, 1, device_model_args=tuple(ahci),
                                    extra_cfg=("tsc_mode='native'",), firmware="seabios"))
    assert "disk = [  ]" in cfg and "bios = 'seabios'" in cfg and cfg.endswith("tsc_mode = 'native'\n")
    assert f"device_model_args_hvm = [ '-device', 'ahci,id=xtahci0', '-drive', 'file={image}," in cfg
    assert HostDisk("/i.raw", backendtype="qdisk").xl_disks() == ["format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=/i.raw"]
    assert HostDisk("/i.raw", backendtype="qdisk").kind == "qdisk"
    with pytest.raises(BootTestError, match="cannot carry"):
        XentoolsDisk("/a,b.raw", report_path="/r").device_model_args("ide")


def test_xl_cfg_lines_are_checked():
    assert parse_cfg_line("tsc_mode='native'") == "tsc_mode = 'native'"
    assert parse_cfg_line(" cpuid = ['host,fsgsbase=0'] ") == "cpuid = ['host,fsgsbase=0']"
    for bad in ("tsc_mode", "=1", "name='x'", "disk=[]", "a=1\nb=2"):
        with pytest.raises(BootTestError) as err:
            parse_cfg_line(bad)
        assert err.value.rule == "xlcfg.extra"
    with pytest.raises(BootTestError) as err:
        render_xl_cfg(GuestConfig("g", "pv", 256, 1, kernel="/k", firmware="ovmf"))
    assert err.value.rule == "xlcfg.hvm_only"


def test_guest_size_fits_the_host():
    host = HostResources(free_memory_mb=1000, nr_cpus=2)
    assert fit_guest("hvm", host, memory=None, vcpus=None, default_memory=2048, default_vcpus=4) == (976, 2)
    assert fit_guest("pv", host, memory=None, vcpus=None, default_memory=256, default_vcpus=1) == (256, 1)
    assert fit_guest("hvm", host, memory=256, vcpus=3, default_memory=2048, default_vcpus=4) == (256, 3)
    with pytest.raises(BootTestError, match=r"--memory 2048 does not fit.*1000 MiB free.*--memory 976"):
        fit_guest("hvm", host, memory=2048, vcpus=None, default_memory=1, default_vcpus=1)
    with pytest.raises(BootTestError, match=r"not enough free memory for a hvm guest.*100 MiB free"):
        fit_guest("hvm", HostResources(100, 1), memory=None, vcpus=None, default_memory=1024, default_vcpus=1)
    assert parse_xl_info("nr_cpus : 2\nfree_memory : 1001\n") == HostResources(1001, 2)
    with pytest.raises(BootTestError):
        parse_xl_info("garbage")


def hvm_boot(tmp_path, fake, image, **kw):
    disk = HostDisk(str(image), backendtype="qdisk")
    guest = GuestConfig(name=NAME, guest_type="hvm", memory_mb=256, vcpus=1, disks=tuple(disk.xl_disks()))
    test = BootTest(image=str(image), image_format="raw", guest=guest, rules=kw.pop("r", None) or rules(),
                    disk=disk, out_dir=tmp_path / "out", xl=str(fake.path), liveness_interval=0.05,
                    xen_log_interval=0.1)
    return test.run()


def test_hvm_console_is_the_serial_port_and_a_failed_attach_is_an_error(tmp_path, fake, image):
    fake.configure(console_rc=1)
    res = hvm_boot(tmp_path, fake, image)
    assert ["console", "-t", "serial", NAME] in fake.calls()
    assert res.decision.verdict is Verdict.ERROR and res.exit_code == 4
    assert "xl console exited 1 while the guest still runs" in res.decision.reason
    assert res.console_mode == "serial" and fake.live_domains() == [] and commands(fake)[-1] == "destroy"


def test_a_triple_fault_in_xens_log_is_an_error_quoting_xen(tmp_path, fake, image):
    fake.configure(transcript=[[0.05, "SYSLINUX 6.04\r\nLoading vmlinuz... ok\r\n"]], dmesg_after=1.0, dmesg=(
        "(XEN) d6v0 Triple fault - invoking HVM shutdown action 1\n"
        "(d7) SeaBIOS (version 1.16.2-debian-1.16.2-1)\n"
        "(XEN) d7v0 Triple fault - invoking HVM shutdown action 1\n(XEN) *** Dumping Dom7 vcpu#0 state: ***\n"
        "(XEN) RIP:    0010:[<ffffffff81a1b2c3>]\n(XEN) some other line about d8v0\n"))
    res = hvm_boot(tmp_path, fake, image)
    d = res.decision
    assert d.verdict is Verdict.ERROR and d.line == "(XEN) d7v0 Triple fault - invoking HVM shutdown action 1"
    assert "Xen killed domain 7" in d.reason and res.exit_code == 4
    assert res.xen_log[:4] == ("(d7) SeaBIOS (version 1.16.2-debian-1.16.2-1)",
                               "(XEN) d7v0 Triple fault - invoking HVM shutdown action 1",
                               "(XEN) *** Dumping Dom7 vcpu#0 state: ***", "(XEN) RIP:    0010:[<ffffffff81a1b2c3>]")
    assert not any("d6v0" in line for line in res.xen_log)
    assert domain_xen_lines("(XEN) HVM d7 save: PIC\n(XEN) HVM d7v0 save: CPU\n(XEN) HVM7 restore: CPU 0\n"
                            "(d7) SeaBIOS\n(d17) other\n", 7) == ["(d7) SeaBIOS"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["xen_log"] == list(res.xen_log) and report["verdict"] == "error"
    assert {"bootloader", "firmware", "verdict"} <= set(report["milestones_s"])


def test_a_disk_the_firmware_cannot_boot_is_no_output_quoting_seabios(tmp_path, fake, image):
    fake.configure(transcript=[], dmesg=(
        "(d7) Booting from Hard Disk...\n(d7) Boot failed: not a bootable disk\n(d7) \n"
        "(d7) No bootable device.  Retrying in 60 seconds.\n"))
    res = hvm_boot(tmp_path, fake, image, r=rules(first_output_timeout=30.0, boot_timeout=60.0))
    d = res.decision
    assert d.verdict is Verdict.NO_OUTPUT and d.line == "Boot failed: not a bootable disk"
    assert "the firmware found no bootable disk" in d.reason and res.exit_code == 6
    assert res.duration < 20  # decided when SeaBIOS gave up, not at the timeout


# ---------------------------------------------------------------------- cfg and checks

def test_render_pv_and_hvm_configs():
    pv = render_xl_cfg(GuestConfig("g1", "pv", 256, 1, kernel="/boot/vmlinuz", ramdisk="/boot/initrd.img",
                                   extra="console=hvc0 root=/dev/xvda1"))
    assert "type = 'pv'" in pv and "kernel = '/boot/vmlinuz'" in pv and "ramdisk = '/boot/initrd.img'" in pv
    assert "extra = 'console=hvc0 root=/dev/xvda1'" in pv and "serial" not in pv
    assert "on_crash = 'destroy'" in pv and "memory = 256" in pv
    hvm = render_xl_cfg(GuestConfig("g2", "hvm", 2048, 2, disks=("format=raw,vdev=xvda,access=rw,target=/i.raw",)))
    assert "serial = 'pty'" in hvm and "kernel" not in hvm and "vcpus = 2" in hvm


@pytest.mark.parametrize("cfg, rule", [
    (GuestConfig("g", "pv", 256, 1), "xlcfg.kernel"),
    (GuestConfig("g", "kvm", 256, 1), "xlcfg.type"),
    (GuestConfig("g'; x", "hvm", 256, 1), "xlcfg.value"),
    (GuestConfig("g", "pv", 256, 1, kernel="/k", extra="a\nb"), "xlcfg.value"),
])
def test_bad_configs_are_refused(cfg, rule):
    with pytest.raises(BootTestError) as err:
        render_xl_cfg(cfg)
    assert err.value.rule == rule


def test_domain_names_are_safe_and_unique_per_process():
    assert domain_name("/x/FreeBSD-14.1-RELEASE-amd64-ufs.raw", pid=42) == "xtbt-FreeBSD-14.1-RELEASE-amd64-ufs-42"
    assert domain_name("/x/we ird$name.img", pid=1) == "xtbt-we-ird-name-1"


def test_preflight(tmp_path, image, fake):
    vhd = tmp_path / "disk.vhd"
    vhd.write_bytes(image.read_bytes() + vhd_footer(1 << 20))
    with pytest.raises(ImageFormatError) as err:
        preflight(vhd, xl=str(fake.path), euid=0)
    assert err.value.rule == "image.not_raw" and "qemu-img convert -f vpc -O raw" in str(err.value)
    with pytest.raises(BootTestError) as err:
        preflight(image, xl=str(fake.path), kernel=str(tmp_path / "nokernel"), euid=0)
    assert err.value.rule == "boottest.kernel_missing"
    with pytest.raises(BootTestError) as err:
        preflight(image, xl="xl-that-does-not-exist-anywhere", euid=0)
    assert err.value.rule == "boottest.no_xl"
    with pytest.raises(BootTestError) as err:
        preflight(image, xl=str(fake.path), euid=1000)
    assert err.value.rule == "boottest.not_root" and "root" in str(err.value)
    info, xl = preflight(image, xl=str(fake.path), euid=0)
    assert info.is_raw and xl == str(fake.path)


# --------------------------------------------------------------------- the CLI, in-process

@pytest.fixture
def as_root(monkeypatch, fake):
    # xl runs only as root; the fake does not care, and the check itself is tested above.
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setenv("PATH", fake.env()["PATH"])
    # The host running these tests need not have Xen's HVM device model installed.
    monkeypatch.setattr("xentools.tools.images.boottest.DEVICE_MODEL",
                        (str(fake.path), "qemu-system-xen", "device_model_override"))


def cli(*args):
    return CliRunner().invoke(image_group, ["boot-test", *args], catch_exceptions=False)


def test_cli_pass_prints_the_verdict_and_writes_files(tmp_path, fake, image, as_root):
    fake.configure(transcript=[[0.02, BOOT + "login: \n"]])
    out = tmp_path / "res"
    r = cli(str(image), "--out", str(out), "--name", NAME, "--prompt-grace", "0.1")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [r.stdout.strip()] and r.stdout.startswith("pass: matched: 'login:'")
    assert {p.name for p in out.iterdir()} == {"xl.cfg", "console.log", "report.json", "junit.xml"}
    cfg = (out / "xl.cfg").read_text()
    assert "type = 'hvm'" in cfg and "memory = 1024" in cfg  # the default profile's


def test_cli_panic_quotes_the_line_and_exits_5(tmp_path, fake, image, as_root):
    fake.configure(transcript=[[0.02, BOOT + PANIC_LINE + "\n"]])
    r = cli(str(image), "--out", str(tmp_path / "res"), "--name", NAME)
    assert r.exit_code == 5
    assert r.stdout.startswith("fail: panic: matched: ") and PANIC_LINE in r.stdout


def test_cli_no_output_exits_6_with_one_line(tmp_path, fake, image, as_root):
    fake.configure(transcript=[])
    r = cli(str(image), "--out", str(tmp_path / "res"), "--name", NAME, "--first-output-timeout", "0.3")
    assert r.exit_code == 6
    assert re.fullmatch(r"timeout: no_output: no output from the guest in 0\.3 s \(\d+\.\d s\)\n", r.stdout)


def test_cli_kernel_makes_a_pv_guest_with_the_profile_command_line(tmp_path, fake, image, as_root):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\x7fELF")
    fake.configure(transcript=[[0.02, "login: \n"]])
    r = cli(str(image), "--out", str(tmp_path / "res"), "--name", NAME, "--kernel", str(kernel),
            "--profile", "linux-pv", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["guest_type"] == "pv" and report["profile"] == "linux-pv" and report["verdict"] == "pass"
    cfg = (tmp_path / "res" / "xl.cfg").read_text()
    assert f"kernel = '{kernel}'" in cfg and "extra = 'console=hvc0'" in cfg and "memory = 256" in cfg


def test_cli_uses_the_profile_fetch_recorded(tmp_path, fake, as_root):
    img = tmp_path / "FreeBSD-13.4-RELEASE-amd64.raw"
    img.write_bytes(bytes(freebsd_like_image(1 << 20)))
    fake.configure(transcript=[[0.02, "login: \n"]])
    r = cli(str(img), "--out", str(tmp_path / "res"), "--name", NAME, "--json")
    assert json.loads(r.stdout)["profile"] == "freebsd-13"
    (tmp_path / (img.name + ".fetch.json")).write_text(json.dumps({"profile": "linux-pv"}))
    r = cli(str(img), "--out", str(tmp_path / "res2"), "--name", NAME, "--json", "--type", "hvm")
    assert json.loads(r.stdout)["profile"] == "linux-pv"


def test_cli_error_is_said_once_and_results_go_to_a_reported_temporary_directory(tmp_path, fake, image, as_root,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake.configure(create_rc=3)
    r = cli(str(image), "--name", NAME)
    assert r.exit_code == 4
    assert r.stdout.startswith("error: boottest.xl_failed: xl create failed") and "error: error" not in r.stdout
    assert not (tmp_path / "boot-test-results").exists()
    made = re.search(r"results go to (\S+) ", r.stderr).group(1)
    assert Path(made).is_dir() and (Path(made) / "report.json").exists()
    r = cli(str(image), "--name", NAME, "--results-dir", str(tmp_path / "rd"))
    assert (tmp_path / "rd" / NAME / "report.json").exists()


def test_cli_memory_that_does_not_fit_is_one_line(tmp_path, fake, image, as_root):
    fake.configure(free_memory=900)
    r = cli(str(image), "--out", str(tmp_path / "res"), "--memory", "2048")
    assert r.exit_code == 4 and r.stdout == ""
    assert r.stderr.startswith("xentools: error: boottest.memory: --memory 2048 does not fit") and r.stderr.count("\n") == 1
    assert "create" not in commands(fake)
    fake.configure(transcript=[[0.02, "login: \n"]], free_memory=900, nr_cpus=1)
    r = cli(str(image), "--out", str(tmp_path / "res"), "--name", NAME, "--json", "--emulated-disk", "ahci",
            "--xl-cfg", "tsc_mode='native'", "--backend", "qdisk")
    assert r.exit_code == 0, r.stderr
    cfg = (tmp_path / "res" / "xl.cfg").read_text()
    assert "memory = 876" in cfg and "vcpus = 1" in cfg and "hdtype = 'ahci'" in cfg and "tsc_mode = 'native'" in cfg
    assert "backendtype=qdisk" in cfg


def test_cli_refuses_hvm_options_for_pv_and_a_missing_device_model(tmp_path, fake, image, as_root, monkeypatch):
    r = cli(str(image), "--type", "pv", "--kernel", str(image), "--firmware", "ovmf")
    assert r.exit_code == 4 and "boottest.hvm_only" in r.stderr
    monkeypatch.setattr("xentools.tools.images.boottest.DEVICE_MODEL",
                        (str(tmp_path / "no-qemu"), "qemu-system-xen", "device_model_override"))
    r = cli(str(image), "--out", str(tmp_path / "res"))
    assert r.exit_code == 4 and r.stderr.count("\n") == 1
    assert "boottest.hvm_missing" in r.stderr and "apt-get install qemu-system-xen" in r.stderr


def test_a_vhd_named_raw_is_never_converted_onto_itself(tmp_path, fake, image):
    vhd = tmp_path / "disk.raw"
    vhd.write_bytes(image.read_bytes() + vhd_footer(1 << 20))
    with pytest.raises(ImageFormatError) as err:
        preflight(vhd, xl=str(fake.path), euid=0)
    assert f"qemu-img convert -f vpc -O raw {vhd} {tmp_path / 'disk-converted.raw'}" in str(err.value)
    info, _ = preflight(vhd, xl=str(fake.path), euid=0, force_format="raw")
    assert info.format == "vhd"


def test_cli_pvgrub_boots_a_pv_guest_from_the_images_own_grub_cfg(tmp_path, fake, image, as_root, monkeypatch):
    grub = tmp_path / "grub-x86_64-xen.bin"
    grub.write_bytes(b"\x7fELF")
    monkeypatch.setattr("xentools.tools.image_cmd.PVGRUB", (str(grub), "grub-xen-host"))
    fake.configure(transcript=[[0.02, "GNU GRUB  version 2.06\n"], [0.02, "login: \n"]])
    r = cli(str(image), "--out", str(tmp_path / "res"), "--name", NAME, "--bootloader", "pvgrub", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["guest_type"] == "pv" and set(report["milestones_s"]) >= {"bootloader", "verdict"}
    assert "kernel" not in report["milestones_s"]
    cfg = (tmp_path / "res" / "xl.cfg").read_text()
    assert f"kernel = '{grub}'" in cfg and "extra" not in cfg and "ramdisk" not in cfg
    r = cli(str(image), "--bootloader", "pvgrub", "--kernel", str(grub))
    assert r.exit_code == 4 and "boottest.bootloader" in r.stderr and "not both" in r.stderr
    monkeypatch.setattr("xentools.tools.image_cmd.PVGRUB", (str(tmp_path / "none.bin"), "grub-xen-host"))
    r = cli(str(image), "--bootloader", "pvgrub")
    assert r.exit_code == 4 and "apt-get install grub-xen-host" in r.stderr


def test_cli_an_hvm_disk_cannot_be_read_only_on_the_hosts_backends(tmp_path, fake, image, as_root):
    r = cli(str(image), "--read-only", "--backend", "qdisk")
    assert r.exit_code == 4 and r.stderr.startswith("xentools: error: boottest.read_only: ")
    assert "--backend xentools" in r.stderr and "create" not in commands(fake)


def test_host_disk_reads_the_frontends_state_for_the_blkfront_milestone():
    states = iter([b"1", b"4"])
    reads = []

    class Xs:
        def read(self, path):
            reads.append(path)
            return next(states)

        def close(self):
            pass

    disk = HostDisk("/i.raw", backendtype="qdisk", connect=Xs)
    assert disk.connected() is False  # before start(): no domain yet
    disk.start(7)
    assert disk.connected() is False and disk.connected() is True and disk.connected() is True
    assert reads == ["/local/domain/7/device/vbd/51712/state"] * 2
    disk.stop()

    def no_xenstore():
        raise BootTestError("x", "no xenstore")

    lonely = HostDisk("/i.raw", connect=no_xenstore)
    lonely.start(7)
    assert lonely.connected() is False and lonely.connected() is False
