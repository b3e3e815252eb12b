"""The boot verdict: console text and a clock in, one decision out.

Owns: the verdicts (pass, panic, mountroot, ended, timeout, no_output, error), their outcome
and exit code, and `VerdictEngine`, which is fed console bytes in chunks of any size with the
time they arrived and decides by patterns and timeouts, quoting the line that decided.
Must not: read a file, run a process, or look at the real clock: the caller passes `now`
(seconds, monotonic), so that every decision can be replayed in a test.

Matching rules:
- Bytes are decoded as UTF-8 (invalid bytes replaced) and split into lines at "\\n"; each
  line is matched with ANSI escape sequences and control characters (CR, BS) removed.
- Patterns are tested in VERDICT order, so a line that shows a panic and a login prompt at
  once is a panic. The first line that matches decides; later output changes nothing.
- A prompt waits for input without ending its line ("login: ", "db> ", "mountroot> "): an
  unterminated last line that matches decides once the console has been quiet for
  `prompt_grace` seconds, or when its newline arrives (then the whole line is quoted).
- Timeouts: no byte at all within `first_output_timeout` -> no_output; no output for
  `idle_timeout` (0: off) -> timeout; no decision within `boot_timeout` -> timeout (or
  no_output if nothing ever came).
"""

from __future__ import annotations

import codecs
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from xentools.tools.images.errors import CatalogError

__all__ = ["Decision", "Outcome", "Rules", "Verdict", "VerdictEngine", "clean_line"]

MAX_LINE = 16 * 1024


class Outcome(enum.Enum):
    """What a verdict means to a test runner, with xtf-runner's exit codes (it keeps clear of
    1 and 2, which Python and click use for their own errors)."""

    PASS = ("pass", 0)
    ERROR = ("error", 4)
    FAIL = ("fail", 5)
    TIMEOUT = ("timeout", 6)

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def exit_code(self) -> int:
        return self.value[1]


class Verdict(enum.Enum):
    PASS = "pass"            # the pass pattern (a login prompt) appeared
    PANIC = "panic"          # panic:, Fatal trap, failed assertion, the debugger, Kernel panic
    MOUNTROOT = "mountroot"  # the kernel could not mount its root file system
    ENDED = "ended"          # the console closed (guest gone) before any pattern
    TIMEOUT = "timeout"      # output, but no pattern in time
    NO_OUTPUT = "no_output"  # not one byte in time
    ERROR = "error"          # the test itself failed (xl, backend), not the guest

    @property
    def outcome(self) -> Outcome:
        return _OUTCOMES[self]


_OUTCOMES = {
    Verdict.PASS: Outcome.PASS,
    Verdict.PANIC: Outcome.FAIL,
    Verdict.MOUNTROOT: Outcome.FAIL,
    Verdict.ENDED: Outcome.FAIL,
    Verdict.TIMEOUT: Outcome.TIMEOUT,
    Verdict.NO_OUTPUT: Outcome.TIMEOUT,
    Verdict.ERROR: Outcome.ERROR,
}

# The verdicts patterns can give, in the order a line is tested.
PATTERN_VERDICTS = (Verdict.PANIC, Verdict.MOUNTROOT, Verdict.PASS)

# CSI sequences, OSC strings, nF sequences (charset selection, "ESC ( B"), Fe escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]+[0-~]|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_line(text: str) -> str:
    """A console line as a person reads it: no ANSI escapes, no control characters."""
    return _CONTROL.sub("", _ANSI.sub("", text))


@dataclass(frozen=True)
class Rules:
    """Compiled patterns (in test order) and timeouts in seconds."""

    patterns: tuple[tuple[Verdict, re.Pattern[str]], ...]
    first_output_timeout: float
    boot_timeout: float
    idle_timeout: float = 0.0
    prompt_grace: float = 1.0

    @classmethod
    def build(cls, patterns: Mapping[str, Sequence[str]], *, first_output_timeout: float,
              boot_timeout: float, idle_timeout: float = 0.0, prompt_grace: float = 1.0) -> Rules:
        """From {"panic": [regex, ...], "mountroot": [...], "pass": [...]}."""
        known = {v.value for v in PATTERN_VERDICTS}
        for key in patterns:
            if key not in known:
                raise CatalogError("verdict.pattern", f"no verdict {key!r} (known: {', '.join(sorted(known))})")
        if not patterns.get("pass"):
            raise CatalogError("verdict.pattern", "at least one pass pattern is needed")
        if first_output_timeout <= 0 or boot_timeout <= 0 or idle_timeout < 0 or prompt_grace < 0:
            raise CatalogError("verdict.timeout", "timeouts must be positive (idle_timeout and prompt_grace may be 0)")
        compiled = []
        for verdict in PATTERN_VERDICTS:
            for source in patterns.get(verdict.value, ()):
                try:
                    compiled.append((verdict, re.compile(source)))
                except re.error as err:
                    raise CatalogError("verdict.pattern", f"{verdict.value} pattern {source!r}: {err}") from None
        return cls(tuple(compiled), float(first_output_timeout), float(boot_timeout), float(idle_timeout),
                   float(prompt_grace))

    def match(self, line: str) -> tuple[Verdict, str] | None:
        for verdict, regex in self.patterns:
            if regex.search(line):
                return verdict, regex.pattern
        return None


@dataclass(frozen=True)
class Decision:
    """A verdict, why, and the console line that decided it (None for timeouts without output)."""

    verdict: Verdict
    reason: str
    line: str | None
    line_no: int | None
    pattern: str | None
    elapsed: float

    @property
    def outcome(self) -> Outcome:
        return self.verdict.outcome

    def summary(self) -> str:
        """One line: 'panic: matched 'panic: ...' (line 12, 3.4 s)'."""
        where = f"line {self.line_no}, " if self.line_no else ""
        quoted = f": {self.line!r}" if self.line is not None else ""
        return f"{self.verdict.value}: {self.reason}{quoted} ({where}{self.elapsed:.1f} s)"


class VerdictEngine:
    """Feeds console bytes and clock readings to Rules; `decision` is set once, then final."""

    def __init__(self, rules: Rules, start: float) -> None:
        self.rules = rules
        self.start = start
        self.decision: Decision | None = None
        self.bytes_seen = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = ""          # the unterminated last line, as received
        self._lines = 0          # complete lines seen
        self._last_visible = ""  # the last non-blank complete line, cleaned
        self._last_output: float | None = None
        self._pending: tuple[Verdict, str] | None = None  # the tail matches this

    # -- input

    def feed(self, data: bytes, now: float) -> Decision | None:
        """Console bytes that arrived at `now`; returns the decision once there is one."""
        if self.decision is not None:
            return self.decision
        if data:
            self.bytes_seen += len(data)
            self._last_output = now
            self._consume(self._decoder.decode(data), now)
            if self.decision is not None:
                return self.decision
        return self.tick(now)

    def tick(self, now: float) -> Decision | None:
        """Apply the prompt grace and the timeouts at time `now`."""
        if self.decision is not None:
            return self.decision
        r = self.rules
        elapsed = now - self.start
        if self._pending is not None and self._last_output is not None and now - self._last_output >= r.prompt_grace:
            verdict, pattern = self._pending
            return self._decide(verdict, "matched", clean_line(self._tail), self._lines + 1, pattern, now)
        if self.bytes_seen == 0 and (elapsed >= r.first_output_timeout or elapsed >= r.boot_timeout):
            limit = min(r.first_output_timeout, r.boot_timeout)
            return self._decide(Verdict.NO_OUTPUT, f"no output from the guest in {limit:g} s", None, None, None, now)
        if (r.idle_timeout and self._last_output is not None and now - self._last_output >= r.idle_timeout):
            return self._decide(Verdict.TIMEOUT, f"no output for {r.idle_timeout:g} s; last line",
                                self._last_line(), None, None, now)
        if elapsed >= r.boot_timeout:
            return self._decide(Verdict.TIMEOUT, f"no verdict pattern in {r.boot_timeout:g} s; last line",
                                self._last_line(), None, None, now)
        return None

    def finish(self, now: float, why: str = "the console closed") -> Decision:
        """The console ended (guest gone): decide with what there is."""
        if self.decision is not None:
            return self.decision
        rest = self._decoder.decode(b"", final=True)
        if rest:
            self._consume(rest, now)
            if self.decision is not None:
                return self.decision
        if self._pending is not None:
            verdict, pattern = self._pending
            return self._decide(verdict, "matched", clean_line(self._tail), self._lines + 1, pattern, now)
        if self.bytes_seen == 0:
            return self._decide(Verdict.NO_OUTPUT, f"{why} before any output", None, None, None, now)
        return self._decide(Verdict.ENDED, f"{why} before a verdict pattern; last line", self._last_line(),
                            None, None, now)

    def error(self, now: float, reason: str) -> Decision:
        """The test itself failed; the guest's output so far decides nothing."""
        if self.decision is None:
            self._decide(Verdict.ERROR, reason, None, None, None, now)
        assert self.decision is not None
        return self.decision

    def next_deadline(self) -> float:
        """The latest time at which tick() must be called for timeouts to be on time."""
        r = self.rules
        times = [self.start + r.boot_timeout]
        if self.bytes_seen == 0:
            times.append(self.start + r.first_output_timeout)
        if self._last_output is not None:
            if self._pending is not None:
                times.append(self._last_output + r.prompt_grace)
            if r.idle_timeout:
                times.append(self._last_output + r.idle_timeout)
        return min(times)

    # -- internals

    def _consume(self, text: str, now: float) -> None:
        *lines, tail = (self._tail + text).split("\n")
        for raw in lines:
            self._lines += 1
            line = clean_line(raw)
            if line.strip():
                self._last_visible = line
            hit = self.rules.match(line)
            if hit is not None:
                self._decide(hit[0], "matched", line, self._lines, hit[1], now)
                return
        # A line with no end in sight is cut from the front: its end is what may match.
        self._tail = tail[-MAX_LINE:]
        shown = clean_line(self._tail)
        self._pending = self.rules.match(shown) if shown.strip() else None

    def _last_line(self) -> str | None:
        tail = clean_line(self._tail)
        if tail.strip():
            return tail.rstrip()
        return self._last_visible.rstrip() or None

    def _decide(self, verdict: Verdict, reason: str, line: str | None, line_no: int | None,
                pattern: str | None, now: float) -> Decision:
        self.decision = Decision(verdict, reason, line.rstrip() if line is not None else None, line_no,
                                 pattern, max(0.0, now - self.start))
        return self.decision
