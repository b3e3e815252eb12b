"""The one xl guest lifecycle (xentools.tools.images.xl) driven by a scripted Runner: the
xl.cfg of a guest kept after it ended, an xl killed by a signal asked again (never `create`)
and every repeat told, a domain taken for gone only when the whole `xl list` lacks it,
destroy's answers; and the initramfs pieces the nested harness and the test guests share
(xentools.tools.images.initramfs)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from xentools.tools.images.errors import BootTestError
from xentools.tools.images.initramfs import Cpio, newest_kernel
from xentools.tools.images.xl import (
    Completed,
    GuestConfig,
    Runner,
    XlDomain,
    domains,
    render_xl_cfg,
    run_xl,
)

LIST_HEAD = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n"
DOM0 = "Domain-0                                     0  1024     2     r-----      12.0\n"


def listing(*rows: tuple[str, int, str]) -> str:
    return LIST_HEAD + DOM0 + "".join(f"{n:<40}{d:>6}   128     1     {f}       0.5\n" for n, d, f in rows)


class Scripted(Runner):
    """Answers each `xl ARGS` with the next Completed queued for ARGS (the last one again
    once the queue is down to it); records every call."""

    def __init__(self, answers: dict[tuple[str, ...], list[Completed]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv, timeout):  # type: ignore[no-untyped-def]
        args = tuple(argv[1:])
        self.calls.append(args)
        queue = self.answers[args]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def spawn_console(self, argv):  # type: ignore[no-untyped-def]
        raise AssertionError("no console here")


def ok(out: str = "") -> Completed:
    return Completed(0, out, "")


def failed(rc: int, err: str = "") -> Completed:
    return Completed(rc, "", err)


def domain(runner: Scripted, told: list[str] | None = None, domid: int | None = 5) -> XlDomain:
    d = XlDomain("g1", runner=runner, on_rerun=None if told is None else told.append, sleep=lambda s: None)
    d.domid = domid
    return d


def test_a_pv_guest_kept_after_it_ended_and_a_bad_action_refused():
    cfg = GuestConfig("g1", "pv", 128, 1, kernel="/k", ramdisk="/r", extra="console=hvc0",
                      on_poweroff="preserve", on_reboot="preserve", on_crash="preserve")
    text = render_xl_cfg(cfg)
    assert "type = 'pv'" in text and "kernel = '/k'" in text and "ramdisk = '/r'" in text
    assert "disk = [  ]" in text
    assert [line for line in text.splitlines() if line.startswith("on_")] == [
        "on_poweroff = 'preserve'", "on_reboot = 'preserve'", "on_crash = 'preserve'"]
    assert "on_crash = 'destroy'" in render_xl_cfg(GuestConfig("g1", "pv", 128, 1, kernel="/k"))
    with pytest.raises(BootTestError) as err:
        render_xl_cfg(GuestConfig("g1", "pv", 128, 1, kernel="/k", on_crash="reboot"))
    assert err.value.rule == "xlcfg.action" and "preserve" in str(err.value)


def test_an_xl_killed_by_a_signal_is_asked_again_once_and_told():
    told: list[str] = []
    runner = Scripted({("unpause", "g1"): [failed(-11), ok()], ("create", "-p", "/c"): [failed(-11), ok()]})
    assert run_xl(["unpause", "g1"], runner=runner, on_rerun=told.append).returncode == 0
    assert told == ["`xl unpause g1` was killed by signal 11; asked again"]
    # create may have made the domain before it crashed: never asked again.
    assert run_xl(["create", "-p", "/c"], runner=runner, on_rerun=told.append).returncode == -11
    assert runner.calls == [("unpause", "g1"), ("unpause", "g1"), ("create", "-p", "/c")]
    assert len(told) == 1
    # Twice killed: the second answer stands (no third try).
    runner = Scripted({("domid", "g1"): [failed(-11), failed(-6), ok("5")]})
    assert run_xl(["domid", "g1"], runner=runner).returncode == -6


def test_state_is_read_by_domid_and_gone_only_when_the_whole_list_lacks_it():
    runner = Scripted({("list", "5"): [ok(listing(("g1", 5, "-b----")))]})
    d = domain(runner)
    assert d.state() == "-b----" and d.ended() is None

    # `xl list 5` failed (xl crashed) while the whole list shows the domain: its state, told.
    told: list[str] = []
    runner = Scripted({("list", "5"): [failed(1, "xl: garbage in xl.conf")],
                       ("list",): [ok(listing(("g1", 5, "--p--d")))]})
    assert domain(runner, told).state() == "--p--d"
    assert len(told) == 1 and "`xl list 5` exited 1" in told[0] and "shows the domain" in told[0]

    # The whole list lacks it: gone, nothing told.
    told = []
    runner = Scripted({("list", "5"): [failed(1, "invalid domain")], ("list",): [ok(listing(("other", 6, "-b----")))]})
    assert domain(runner, told).state() is None and told == []
    assert domain(runner, told).ended() == "gone"

    # The whole list unreadable (crashed, no Domain-0 line) twice, then read: gone.
    runner = Scripted({("list", "5"): [failed(1)], ("list",): [failed(-11), ok("garbage"), ok(listing())]})
    assert domain(runner).state() is None
    # Never readable: an error, not "gone".
    runner = Scripted({("list", "5"): [failed(1, "boom")], ("list",): [failed(1)]})
    with pytest.raises(BootTestError, match="failed 4 times: boom"):
        domain(runner).state()


@pytest.mark.parametrize(("flags", "end"), [("r-----", None), ("---s--", "shutdown"), ("----cd", "crashed"),
                                            ("-----d", "shutdown")])
def test_ended_from_the_flags(flags, end):
    runner = Scripted({("list", "5"): [ok(listing(("g1", 5, flags)))]})
    assert domain(runner).ended() == end


def test_create_learns_the_domid_and_a_failed_create_keeps_libxls_words():
    runner = Scripted({("create", "-p", "/c"): [ok("Parsing config from /c\n")], ("domid", "g1"): [ok("9\n")]})
    d = domain(runner, domid=None)
    assert d.create("/c") == 9 and d.domid == 9 and d.created and d.create_output == "Parsing config from /c"
    runner = Scripted({("create", "-p", "/c"): [Completed(3, "libxl: error: the reason\n", "xl: failed\n")]})
    d = domain(runner, domid=None)
    with pytest.raises(BootTestError, match=r"xl create failed \(exit 3\): xl: failed") as err:
        d.create("/c")
    assert err.value.rule == "boottest.xl_failed"
    assert not d.created and d.domid is None and "the reason" in d.create_failure


def test_destroy_says_why_only_while_the_domain_is_still_there():
    runner = Scripted({("destroy", "g1"): [ok()]})
    assert domain(runner).destroy() is None
    runner = Scripted({("destroy", "g1"): [failed(1, "no such domain")], ("domid", "g1"): [failed(1)]})
    assert domain(runner).destroy() is None  # gone before: destroyed all the same
    runner = Scripted({("destroy", "g1"): [failed(1, "libxl: error\nbusy")], ("domid", "g1"): [ok("5")]})
    assert domain(runner).destroy() == "busy"


def test_wait_gone_and_wait_ended_are_bounded():
    runner = Scripted({("list", "5"): [ok(listing(("g1", 5, "-----d"))), failed(1)], ("list",): [ok(listing())]})
    assert domain(runner).wait_gone(5) is True
    runner = Scripted({("list", "5"): [ok(listing(("g1", 5, "r-----")))]})
    assert domain(runner).wait_gone(0) is False
    assert domain(runner).wait_ended(0) is None


def test_domains_lists_every_row():
    runner = Scripted({("list",): [ok(listing(("g1", 5, "-b----"), ("g2", 7, "--p---")))]})
    assert domains(runner=runner) == [("Domain-0", 0), ("g1", 5), ("g2", 7)]


def test_cpio_newc_entries_are_aligned_and_end_with_the_trailer():
    archive = Cpio()
    archive.directory("bin")
    archive.file("bin/sh", b"abc", executable=True)
    archive.chardev("console", 5, 1)
    data = archive.finish()
    entries = []
    at = 0
    while True:
        head = data[at:at + 110]
        assert head[:6] == b"070701" and at % 4 == 0
        fields = [int(head[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[at + 110:at + 110 + namesize - 1].decode()
        at += 110 + namesize
        at += -at % 4
        body = data[at:at + filesize]
        at += filesize
        at += -at % 4
        entries.append((name, fields[1], body, (fields[9], fields[10])))
        if name == "TRAILER!!!":
            break
    assert at == len(data)
    assert entries == [("bin", stat.S_IFDIR | 0o755, b"", (0, 0)), ("bin/sh", stat.S_IFREG | 0o755, b"abc", (0, 0)),
                       ("console", stat.S_IFCHR | 0o600, b"", (5, 1)), ("TRAILER!!!", 0, b"", (0, 0))]


def test_newest_kernel_is_the_newest_with_its_modules(tmp_path: Path):
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    assert newest_kernel(boot, modules) is None
    for version, mtime in (("6.1.0-1", 100), ("6.1.0-2", 200), ("6.1.0-3", 300)):
        (boot / f"vmlinuz-{version}").write_bytes(b"k")
        os.utime(boot / f"vmlinuz-{version}", (mtime, mtime))
    for version in ("6.1.0-1", "6.1.0-2"):  # 6.1.0-3's modules are not installed
        (modules / version).mkdir(parents=True)
        (modules / version / "modules.dep").write_text("")
    assert newest_kernel(boot, modules) == ("6.1.0-2", boot / "vmlinuz-6.1.0-2")
