"""The verdict engine: console chunks and a clock in, a verdict with the deciding line out."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.tools.images.catalog import load_catalog
from xentools.tools.images.errors import CatalogError
from xentools.tools.images.verdict import Outcome, Rules, Verdict, VerdictEngine, clean_line

CATALOG = load_catalog(Path(__file__).resolve().parents[1] / "vm-images" / "catalog.toml")
PATTERNS = CATALOG.profile("default").patterns


def rules(**kw):
    opts = {"first_output_timeout": 10.0, "boot_timeout": 100.0, "idle_timeout": 0.0, "prompt_grace": 1.0}
    opts.update(kw)
    return Rules.build(PATTERNS, **opts)


def run(text: str | bytes, *, r=None, chunk=None, end: float | None = None):
    """Feed `text` at t=1 (in chunks of `chunk` bytes), then tick at `end` if given."""
    eng = VerdictEngine(r or rules(), start=0.0)
    data = text.encode() if isinstance(text, str) else text
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        eng.feed(data[i:i + step], 1.0)
    if end is not None:
        eng.tick(end)
    return eng


BOOT = (
    "Consoles: internal video/keyboard  serial port\n"
    "FreeBSD/x86 bootstrap loader, Revision 1.1\n"
    "Booting...\n"
    "Copyright (c) 1992-2023 The FreeBSD Project.\n"
    "xbd0: 5120MB <Virtual Block Device> at device/vbd/51712 on xenbusb_front0\n"
)

# (console text, verdict, quoted line) - each line in the style of the kernel that prints it.
TABLE = [
    (BOOT + "\nFreeBSD/amd64 (freebsd) (ttyu0)\n\nlogin: \n", Verdict.PASS, "login:"),
    (BOOT + "panic: Assertion nseg <= sc->xbd_max_request_segments failed at "
            "/usr/src/sys/dev/xen/blkfront/blkfront.c:312\ncpuid = 0\n",
     Verdict.PANIC, "panic: Assertion nseg <= sc->xbd_max_request_segments failed at "
                    "/usr/src/sys/dev/xen/blkfront/blkfront.c:312"),
    (BOOT + "panic: xbd_indirectpage_cb: bad nseg\n", Verdict.PANIC, "panic: xbd_indirectpage_cb: bad nseg"),
    (BOOT + "\n\nFatal trap 12: page fault while in kernel mode\ncpuid = 1; apic id = 01\n",
     Verdict.PANIC, "Fatal trap 12: page fault while in kernel mode"),
    (BOOT + "KDB: enter: panic\n[ thread pid 0 tid 100000 ]\n", Verdict.PANIC, "KDB: enter: panic"),
    (BOOT + "Stopped at      kdb_enter+0x33:  movq    $0,0x12f1ad2(%rip)\ndb> \n", Verdict.PANIC, "db>"),
    ("[    0.812] VFS: Cannot open root device \"xvda1\"\n"
     "[    0.813] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(202,1)\n",
     Verdict.PANIC, "[    0.813] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(202,1)"),
    (BOOT + "Mounting from ufs:/dev/gpt/rootfs failed with error 19.\n\nLoader variables:\n",
     Verdict.MOUNTROOT, "Mounting from ufs:/dev/gpt/rootfs failed with error 19."),
    (BOOT + "mountroot> \n", Verdict.MOUNTROOT, "mountroot>"),
]


@pytest.mark.parametrize("text, verdict, line", TABLE)
def test_each_pattern_decides_and_quotes_its_line(text, verdict, line):
    eng = run(text)
    d = eng.decision
    assert d is not None and d.verdict is verdict
    assert d.line == line
    assert d.line_no == text.split("\n").index(next(x for x in text.split("\n") if x.rstrip() == line)) + 1
    assert d.pattern is not None


@pytest.mark.parametrize("text, verdict, line", TABLE)
def test_one_byte_at_a_time_gives_the_same_decision(text, verdict, line):
    whole, bytewise = run(text).decision, run(text, chunk=1).decision
    assert (bytewise.verdict, bytewise.line, bytewise.line_no) == (whole.verdict, whole.line, whole.line_no)


def test_outcomes_and_exit_codes_follow_xtf_runner():
    assert {v: v.outcome for v in Verdict} == {
        Verdict.PASS: Outcome.PASS, Verdict.PANIC: Outcome.FAIL, Verdict.MOUNTROOT: Outcome.FAIL,
        Verdict.ENDED: Outcome.FAIL, Verdict.TIMEOUT: Outcome.TIMEOUT, Verdict.NO_OUTPUT: Outcome.TIMEOUT,
        Verdict.ERROR: Outcome.ERROR}
    assert [o.exit_code for o in (Outcome.PASS, Outcome.ERROR, Outcome.FAIL, Outcome.TIMEOUT)] == [0, 4, 5, 6]


def test_a_line_with_panic_and_login_is_a_panic():
    assert run("panic: bad thing; login: \n").decision.verdict is Verdict.PANIC


def test_first_deciding_line_wins_and_later_output_is_ignored():
    eng = run("login: \npanic: later\n")
    assert eng.decision.verdict is Verdict.PASS
    assert eng.feed(b"panic: even later\n", 2.0).verdict is Verdict.PASS


def test_crlf_ansi_and_backspaces_are_removed_before_matching():
    text = "\x1b[2J\x1b[1;1HBooting...\r\n|\b/\b-\b\\\b\r\n\x1b[0mpanic: \x1b[1mbad\x1b[0m\r\n"
    d = run(text).decision
    assert d.verdict is Verdict.PANIC and d.line == "panic: bad" and d.line_no == 3
    assert clean_line("a\x1b]0;title\x07b\x1b(Bc") == "abc"


def test_escape_split_across_chunks_is_still_removed():
    eng = VerdictEngine(rules(), 0.0)
    eng.feed(b"pan\x1b[", 1.0)
    eng.feed(b"1mic: split\n", 1.0)
    assert eng.decision.verdict is Verdict.PANIC and eng.decision.line == "panic: split"


def test_invalid_utf8_is_replaced_not_fatal():
    d = run(b"\xff\xfe garbage\npanic: \xc3\x28 bad bytes\n").decision
    assert d.verdict is Verdict.PANIC and "\ufffd" in d.line


def test_unterminated_prompt_decides_after_quiet_grace():
    eng = VerdictEngine(rules(prompt_grace=1.0), 0.0)
    assert eng.feed(b"FreeBSD/amd64 (x) (ttyu0)\n\nlogin: ", 5.0) is None
    assert eng.next_deadline() == 6.0
    assert eng.tick(5.9) is None
    d = eng.tick(6.0)
    assert d.verdict is Verdict.PASS and d.line == "login:" and d.line_no == 3 and d.elapsed == 6.0


def test_prompt_grace_restarts_with_new_output_and_the_full_line_is_quoted():
    eng = VerdictEngine(rules(prompt_grace=1.0), 0.0)
    eng.feed(b"panic: ", 1.0)
    assert eng.tick(1.5) is None
    eng.feed(b"the rest of the message", 1.8)
    assert eng.tick(2.5) is None  # quiet for 0.7 s only
    eng.feed(b" and its end\n", 2.6)
    assert eng.decision.line == "panic: the rest of the message and its end"


def test_db_prompt_without_newline():
    eng = VerdictEngine(rules(prompt_grace=0.5), 0.0)
    eng.feed(b"Stopped at kdb_enter+0x33\ndb> ", 1.0)
    assert eng.tick(1.5).verdict is Verdict.PANIC and eng.decision.line == "db>"


def test_no_output_at_all():
    eng = VerdictEngine(rules(first_output_timeout=3.0), 10.0)
    assert eng.tick(12.9) is None
    assert eng.next_deadline() == 13.0
    d = eng.tick(13.0)
    assert d.verdict is Verdict.NO_OUTPUT and d.line is None and "3 s" in d.reason
    assert d.outcome is Outcome.TIMEOUT


def test_boot_timeout_quotes_the_last_line():
    eng = VerdictEngine(rules(boot_timeout=50.0), 0.0)
    eng.feed(b"Booting...\nstarting devd\n\n", 2.0)
    assert eng.tick(49.0) is None
    d = eng.tick(50.0)
    assert d.verdict is Verdict.TIMEOUT and d.line == "starting devd" and "50 s" in d.reason


def test_boot_timeout_before_first_output_timeout_is_no_output():
    d = run("", r=rules(first_output_timeout=100.0, boot_timeout=20.0), end=20.0).decision
    assert d.verdict is Verdict.NO_OUTPUT and "20 s" in d.reason


def test_idle_timeout_counts_from_the_last_byte():
    eng = VerdictEngine(rules(idle_timeout=5.0), 0.0)
    eng.feed(b"Booting...\n", 1.0)
    eng.feed(b"still going", 4.0)
    assert eng.tick(8.9) is None
    d = eng.tick(9.0)
    assert d.verdict is Verdict.TIMEOUT and d.line == "still going" and "no output for 5 s" in d.reason


def test_console_end_without_pattern_is_ended_or_no_output():
    eng = run("Booting...\nUptime: 1s\n")
    d = eng.finish(3.0, "the domain is gone")
    assert d.verdict is Verdict.ENDED and d.line == "Uptime: 1s" and "the domain is gone" in d.reason
    assert d.outcome is Outcome.FAIL
    assert VerdictEngine(rules(), 0.0).finish(1.0).verdict is Verdict.NO_OUTPUT


def test_console_end_settles_a_pending_prompt():
    eng = VerdictEngine(rules(prompt_grace=10.0), 0.0)
    eng.feed(b"mountroot> ", 1.0)
    assert eng.finish(1.1).verdict is Verdict.MOUNTROOT


def test_error_is_final_and_keeps_no_line():
    eng = VerdictEngine(rules(), 0.0)
    eng.feed(b"some output\n", 1.0)
    d = eng.error(2.0, "xl unpause failed")
    assert d.verdict is Verdict.ERROR and d.line is None and d.outcome is Outcome.ERROR
    assert eng.feed(b"login: \n", 3.0).verdict is Verdict.ERROR


def test_summary_is_one_line():
    d = run(TABLE[1][0]).decision
    s = d.summary()
    assert s.startswith("panic: matched: 'panic: Assertion") and "\n" not in s and "line 6" in s


def test_endless_line_is_bounded():
    eng = VerdictEngine(rules(), 0.0)
    for _ in range(100):
        eng.feed(b"x" * 10000, 1.0)
    eng.feed(b" login: ", 1.0)
    assert eng.tick(3.0).verdict is Verdict.PASS
    assert len(eng.decision.line) <= 16 * 1024


@pytest.mark.parametrize("kw, rule", [
    ({"patterns": {"pass": []}}, "verdict.pattern"),
    ({"patterns": {"pass": ["("]}}, "verdict.pattern"),
    ({"patterns": {"pass": ["x"], "crash": ["y"]}}, "verdict.pattern"),
    ({"first_output_timeout": 0}, "verdict.timeout"),
    ({"idle_timeout": -1}, "verdict.timeout"),
])
def test_bad_rules_are_refused(kw, rule):
    args = {"patterns": PATTERNS, "first_output_timeout": 1.0, "boot_timeout": 2.0}
    args.update(kw)
    patterns = args.pop("patterns")
    with pytest.raises(CatalogError) as err:
        Rules.build(patterns, **args)
    assert err.value.rule == rule


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(TABLE) - 1), st.lists(st.integers(1, 50), min_size=1, max_size=40))
def test_any_chunking_gives_the_same_decision(case, sizes):
    text, verdict, line = TABLE[case]
    data = text.encode()
    eng = VerdictEngine(rules(), 0.0)
    pos, i = 0, 0
    while pos < len(data) and eng.decision is None:
        n = sizes[i % len(sizes)]
        eng.feed(data[pos:pos + n], 1.0)
        pos, i = pos + n, i + 1
    assert eng.decision is not None
    assert (eng.decision.verdict, eng.decision.line) == (verdict, line)
