"""The frontend test kit of `image boot-test --backend xentools`: a guest against a faulty
backend (--fault, --fault-matrix) and against every legal backend configuration
(--config-matrix).

Owns: how a guest's console shows its reaction to a misbehaving backend (`classify_reaction`,
pure), the `fault` section of a boot report and its verdict (`fault_section`), the default
fault matrix (`matrix_faults`: one spec per fault kind), the backend configuration matrix
(`config_rows`: a pairwise covering of the knobs, or the rows of a file) and each row's
`blkback serve` options, one matrix row from a boot (`fault_row`, `config_row`), and the
matrix table as JSON, JUnit XML (one test case per row) and text (`write_matrix`,
`matrix_lines`).
Must not: run xl or our blkback (boottest.py does), decide the boot verdict (verdict.py), or
know the fault kinds' effects (devices/blkback_faults.py owns the kinds; only their names
are used here).

Reactions, read from the guest's console (every one seen is listed; the first of this
order is the row's reaction): crash (kernel oops or panic), device-broken (the frontend
marked the disk broken: Linux 6.1 prints "<disk> disabled for further use" after "response
has incorrect id", "response references no pending request", "response has wrong
operation" or "illegal number of responses"), io-error (I/O error lines, a failed
operation, the guest's own FAIL line), hang (the idle or boot timeout ended the boot), and
nothing (the guest booted and printed none of the above).
Row verdict: error when the boot could not be judged (the test's error, or the fault never
fired: it tested nothing); fail when the guest crashed or hung; pass otherwise (it noticed
the fault and survived, or booted through it).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xentools.core.features import RING_PAGE_ORDER_LIMIT
from xentools.tools.images.errors import BootTestError
from xentools.tools.images.verdict import Decision, Verdict

__all__ = [
    "CONFIG_KNOBS", "REACTIONS", "ConfigRow", "MatrixRow", "Reaction", "classify_reaction", "config_row",
    "config_rows", "disk_given_up", "fault_row", "fault_section", "matrix_faults", "matrix_lines", "pairwise", "write_matrix",
]

REACTIONS = ("crash", "device-broken", "io-error", "hang", "nothing")
_REACTION_LINES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("crash", re.compile(r"Kernel panic - |\bOops\b|\bBUG: |kernel BUG at|general protection fault|Call Trace:|"
                         r"^panic: |Fatal trap \d+")),
    ("device-broken", re.compile(r"disabled for further use|backend has misbehaved|illegal number of responses|"
                                 r"response has incorrect id|response references no pending request|"
                                 r"response has wrong operation")),
    ("io-error", re.compile(r"I/O error|\bop failed\b|EXT\d-fs error|GUEST: FAIL |blk_update_request|"
                            r"\bxbd\d+: .*error")),
)
EVIDENCE_KEEP = 5  # lines quoted per reaction


def disk_given_up(console_tail: str) -> bool:
    """Whether the console shows the frontend marking its disk broken (device-broken): after
    that nothing more happens to the disk, so a fault boot need not wait for its timeouts."""
    return _REACTION_LINES[1][1].search(console_tail) is not None


@dataclass(frozen=True)
class Reaction:
    """What the guest showed: `kind` (one of REACTIONS, or "error" when the boot was not
    judged), every kind seen, and up to EVIDENCE_KEEP console lines for each."""

    kind: str
    seen: tuple[str, ...]
    evidence: Mapping[str, tuple[str, ...]]

    def first_line(self) -> str | None:
        lines = self.evidence.get(self.kind, ())
        return lines[0] if lines else None


def classify_reaction(console: str, decision: Decision) -> Reaction:
    """The guest's reaction from its console text and the boot's decision; pure."""
    evidence: dict[str, list[str]] = {}
    for raw in console.splitlines():
        line = raw.strip()
        for kind, pattern in _REACTION_LINES:
            if pattern.search(line):
                found = evidence.setdefault(kind, [])
                if len(found) < EVIDENCE_KEEP:
                    found.append(line[:300])
                break
    if decision.verdict is Verdict.PANIC and "crash" not in evidence:
        evidence["crash"] = [decision.line or decision.reason]
    if decision.verdict in (Verdict.TIMEOUT, Verdict.NO_OUTPUT):
        evidence["hang"] = [decision.reason]
    seen = tuple(kind for kind in REACTIONS if kind in evidence)
    if decision.verdict is Verdict.ERROR:
        kind = "error"
    elif seen:
        kind = seen[0]
    else:
        kind = "nothing"
    return Reaction(kind, seen, {k: tuple(v) for k, v in evidence.items()})


def fault_section(specs: Sequence[str], conformance: Mapping[str, Any] | None, reaction: Reaction,
                  decision: Decision) -> dict[str, Any]:
    """The boot report's `fault` section: the faults as our blkback reported them (fired,
    first firing), the guest's reaction with its lines, and the verdict with its reason."""
    faults = list((conformance or {}).get("faults") or [])
    fired = sum(int(f.get("fired") or 0) for f in faults)
    if decision.verdict is Verdict.ERROR:
        verdict, reason = "error", f"the boot could not be judged: {decision.reason}"
    elif conformance is None:
        verdict, reason = "error", "our blkback wrote no report: whether the fault fired is unknown"
    elif not fired:
        matched = sum(int(f.get("matched") or 0) for f in faults)
        why = "the guest sent no matching request" if not matched else f"{matched} matching requests"
        if matched and any(f.get("kind") == "duplicate" for f in faults):
            why += "; duplicate also needs two requests in flight on one ring"
        verdict, reason = "error", f"the fault never fired ({why}): it tested nothing"
    elif reaction.kind == "crash":
        verdict, reason = "fail", f"the guest crashed: {reaction.first_line()}"
    elif reaction.kind == "hang":
        verdict, reason = "fail", f"the guest hung: {reaction.first_line()}"
    elif reaction.kind == "nothing":
        verdict, reason = "pass", f"the guest showed nothing of the fault (boot verdict {decision.verdict.value})"
    else:
        verdict, reason = "pass", f"the guest survived; {reaction.kind}: {reaction.first_line()}"
    return {
        "specs": list(specs),
        "faults": faults,
        "fired": fired,
        "reaction": reaction.kind,
        "reactions": list(reaction.seen),
        "evidence": {k: list(v) for k, v in reaction.evidence.items()},
        "verdict": verdict,
        "reason": reason,
    }


# ------------------------------------------------------------------------- fault matrix

def matrix_faults(kinds: Iterable[str], *, late_delay: float) -> list[str]:
    """One spec per kind: the bare kind (it fires once, on the first matching request),
    except `late`, held `late_delay` seconds (less than the idle timeout, so that a guest that
    waits is told from one that hangs)."""
    return [f"late:delay={late_delay:g}" if kind == "late" else kind for kind in kinds]


# ----------------------------------------------------------------------- config matrix

# Knob -> its values in the default matrix; the `blkback serve` option of each value.
CONFIG_KNOBS: dict[str, tuple[Any, ...]] = {
    "ring_order": (0, RING_PAGE_ORDER_LIMIT),
    "indirect": (0, 32, 256, 4096),
    "persistent": (True, False),
    "queues": (1, 4),
    "sector_size": (512, 4096),
    "discard": (True, False),
    "read_only": (False, True),
}


@dataclass(frozen=True)
class ConfigRow:
    """One backend configuration: a value per knob."""

    values: Mapping[str, Any]

    @property
    def name(self) -> str:
        v = self.values
        return (f"order{v['ring_order']}-ind{v['indirect']}-{'pers' if v['persistent'] else 'nopers'}-"
                f"q{v['queues']}-{v['sector_size']}-{'disc' if v['discard'] else 'nodisc'}-"
                f"{'ro' if v['read_only'] else 'rw'}")

    def blkback_options(self) -> list[str]:
        """The `xentools blkback serve` options of this row (read-only is the vbd's mode,
        given by boot-test's own --read-only path)."""
        v = self.values
        options = ["--max-ring-page-order", str(v["ring_order"]), "--max-indirect-segments", str(v["indirect"]),
                   "--max-queues", str(v["queues"]), "--sector-size", str(v["sector_size"])]
        if not v["persistent"]:
            options.append("--no-persistent")
        if not v["discard"]:
            options.append("--no-discard")
        return options


def pairwise(knobs: Mapping[str, Sequence[Any]], attempts: int = 12) -> list[dict[str, Any]]:
    """Rows covering every pair of values of every two knobs. Greedy: each new row is the
    candidate of the full product that covers most pairs not yet covered; ties go to the
    first in an order shuffled with a fixed seed, and the smallest of `attempts` coverings
    is kept (deterministic: the same knobs give the same rows)."""
    names = list(knobs)
    pairs = list(itertools.combinations(range(len(names)), 2))
    product = list(itertools.product(*(knobs[n] for n in names)))
    # Each candidate as the frozenset of the value pairs it covers.
    covers = [frozenset((a, combo[a], b, combo[b]) for a, b in pairs) for combo in product]
    everything = frozenset().union(*covers)
    rng = random.Random(0x9A1)
    best: list[int] | None = None
    for attempt in range(attempts):
        order = list(range(len(product)))
        if attempt:
            rng.shuffle(order)
        uncovered = set(everything)
        chosen: list[int] = []
        while uncovered:
            pick = max(order, key=lambda i: len(covers[i] & uncovered))
            chosen.append(pick)
            uncovered -= covers[pick]
        if best is None or len(chosen) < len(best):
            best = chosen
    assert best is not None
    return [dict(zip(names, product[i])) for i in best]


def _knob_value(knob: str, raw: Any, where: str) -> Any:
    allowed = {
        "ring_order": range(0, RING_PAGE_ORDER_LIMIT + 1), "indirect": range(0, 4097),
        "queues": range(1, 65), "sector_size": (512, 1024, 2048, 4096),
    }
    if knob in ("persistent", "discard", "read_only"):
        if not isinstance(raw, bool):
            raise BootTestError("matrix.config", f"{where}: {knob} must be true or false, not {raw!r}")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, int) or raw not in allowed[knob]:
        span = allowed[knob]
        spelled = f"{span.start}..{span.stop - 1}" if isinstance(span, range) else ", ".join(map(str, span))
        raise BootTestError("matrix.config", f"{where}: {knob} {raw!r} is not one of {spelled}")
    return raw


DEFAULT_ROW = {"ring_order": RING_PAGE_ORDER_LIMIT, "indirect": 256, "persistent": True, "queues": 4,
               "sector_size": 512, "discard": True, "read_only": False}


def config_rows(path: str | None = None) -> list[ConfigRow]:
    """The default matrix (pairwise covering of CONFIG_KNOBS), or the rows of a JSON file:
    a list of objects, each giving some knobs (the others keep blkback's defaults)."""
    if path is None:
        return [ConfigRow(row) for row in pairwise(CONFIG_KNOBS)]
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise BootTestError("matrix.config", f"cannot read --config-matrix {path}: {err.strerror}") from None
    except ValueError as err:
        raise BootTestError("matrix.config", f"--config-matrix {path} is not JSON: {err}") from None
    if not isinstance(data, list) or not data:
        raise BootTestError("matrix.config", f"--config-matrix {path} must hold a non-empty JSON list of objects, "
                                             'e.g. [{"ring_order": 0, "indirect": 32}]')
    rows = []
    for index, item in enumerate(data, 1):
        where = f"--config-matrix {path} row {index}"
        if not isinstance(item, dict):
            raise BootTestError("matrix.config", f"{where} is not an object")
        unknown = sorted(set(item) - set(CONFIG_KNOBS))
        if unknown:
            raise BootTestError("matrix.config", f"{where}: unknown knob {unknown[0]!r}; "
                                                 f"knobs: {', '.join(CONFIG_KNOBS)}")
        rows.append(ConfigRow({**DEFAULT_ROW, **{k: _knob_value(k, v, where) for k, v in item.items()}}))
    return rows


# ------------------------------------------------------------------------------ rows

@dataclass(frozen=True)
class MatrixRow:
    """One boot of a matrix: its name, verdict and reason, and the columns of the table."""

    name: str
    verdict: str  # pass, fail, error
    reason: str
    columns: Mapping[str, Any]
    seconds: float
    out_dir: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "reason": self.reason, **self.columns,
                "seconds": round(self.seconds, 3), "out_dir": self.out_dir, **self.details}


def _frontend(conformance: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The frontend entry of our blkback's report that connected (or the first one)."""
    frontends = list(((conformance or {}).get("frontends") or {}).values())
    connected = [fe for fe in frontends if fe.get("connects")]
    return (connected or frontends or [{}])[0]


def _requests(frontend: Mapping[str, Any]) -> dict[str, int]:
    by_op = (frontend.get("requests") or {}).get("by_operation") or {}
    return {op: int(v.get("direct", 0)) + int(v.get("indirect", 0)) for op, v in sorted(by_op.items())}


def fault_row(section: Mapping[str, Any], result: Any) -> MatrixRow:
    """The fault matrix's row of one boot (`result` a BootResult with its fault section)."""
    faults = section["faults"]
    first = faults[0].get("first") if faults else None
    columns = {
        "fault": ", ".join(section["specs"]),
        "fired": section["fired"],
        "first_request": first.get("request") if first else None,
        "reaction": section["reaction"],
        "reactions": section["reactions"],
        "boot_verdict": result.decision.verdict.value,
    }
    return MatrixRow(name=", ".join(section["specs"]), verdict=section["verdict"], reason=section["reason"],
                     columns=columns, seconds=result.duration, out_dir=os.path.dirname(result.files["report"]),
                     details={"evidence": section["evidence"], **_timing(result)})


def config_row(row: ConfigRow, result: Any) -> MatrixRow:
    """The configuration matrix's row of one boot: what the guest negotiated with our
    blkback, how many requests of each kind it sent, the violations, the verdict (the boot's,
    and fail on any violation)."""
    conformance = (result.disk_report or {}).get("conformance")
    frontend = _frontend(conformance)
    negotiated = dict(frontend.get("features") or {})
    violations = dict(frontend.get("violations") or {})
    decision = result.decision
    if decision.verdict is Verdict.ERROR or conformance is None:
        verdict = "error"
        reason = decision.reason if decision.verdict is Verdict.ERROR else "our blkback wrote no report"
    elif violations:
        verdict, reason = "fail", f"{sum(violations.values())} violation(s): {', '.join(sorted(violations))}"
    elif not frontend.get("connects"):
        verdict, reason = "fail", f"the guest never connected to the disk ({decision.verdict.value})"
    elif decision.verdict is not Verdict.PASS:
        verdict, reason = "fail", decision.summary()
    else:
        verdict, reason = "pass", decision.summary()
    columns = {"offered": dict(row.values), "negotiated": negotiated, "requests": _requests(frontend),
               "violations": violations, "boot_verdict": decision.verdict.value}
    return MatrixRow(name=row.name, verdict=verdict, reason=reason, columns=columns, seconds=result.duration,
                     out_dir=os.path.dirname(result.files["report"]), details=_timing(result))


def _timing(result: Any) -> dict[str, Any]:
    """Where a boot's time went: our blkback's start (spawn to InitWait) and the guest's run."""
    return {"blkback_ready_s": (result.disk_report or {}).get("ready_after_s"),
            "guest_s": result.phases.get("guest")}


# ------------------------------------------------------------------------------ table

def _xml(text: str) -> str:
    return re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]", "\ufffd", text)


def matrix_junit(kind: str, profile: str, rows: Sequence[MatrixRow]) -> bytes:
    """JUnit XML: one testsuite, one test case per row (failure for fail, error for error)."""
    suite = ET.Element("testsuite", {
        "name": f"xentools.image.boot-test.{kind}",
        "tests": str(len(rows)),
        "failures": str(sum(r.verdict == "fail" for r in rows)),
        "errors": str(sum(r.verdict == "error" for r in rows)),
        "skipped": "0",
        "time": f"{sum(r.seconds for r in rows):.3f}",
    })
    for row in rows:
        case = ET.SubElement(suite, "testcase", {"classname": f"{kind}.{profile}", "name": _xml(row.name),
                                                 "time": f"{row.seconds:.3f}"})
        props = ET.SubElement(case, "properties")
        for key, value in row.columns.items():
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            ET.SubElement(props, "property", {"name": key, "value": _xml(text)})
        if row.verdict != "pass":
            tag = "error" if row.verdict == "error" else "failure"
            elem = ET.SubElement(case, tag, {"type": str(row.columns.get("reaction", row.verdict)),
                                             "message": _xml(row.reason)})
            elem.text = _xml(row.reason)
        ET.SubElement(case, "system-out").text = _xml(f"files: {row.out_dir}")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def matrix_json(kind: str, profile: str, image: str, rows: Sequence[MatrixRow]) -> dict[str, Any]:
    counts = {v: sum(r.verdict == v for r in rows) for v in ("pass", "fail", "error")}
    return {"schema": 1, "tool": f"xentools image boot-test --{kind}", "image": image, "profile": profile,
            "counts": counts, "rows": [r.to_json() for r in rows]}


def write_matrix(out_dir: Path, kind: str, profile: str, image: str, rows: Sequence[MatrixRow]) -> dict[str, str]:
    """matrix.json and matrix-junit.xml in `out_dir`; returns their paths."""
    files = {"json": str(out_dir / "matrix.json"), "junit": str(out_dir / "matrix-junit.xml")}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        Path(files["json"]).write_text(json.dumps(matrix_json(kind, profile, image, rows), indent=2) + "\n",
                                       encoding="utf-8")
        Path(files["junit"]).write_bytes(matrix_junit(kind, profile, rows))
    except OSError as err:
        raise BootTestError("boottest.output", f"cannot write the matrix to {out_dir}: {err.strerror}") from None
    return files


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def matrix_lines(kind: str, rows: Sequence[MatrixRow]) -> list[str]:
    """The table as text, one line per row."""
    lines = []
    for row in rows:
        c = row.columns
        if kind == "fault-matrix":
            lines.append(f"{row.verdict:<5} {row.name:<24} fired={c['fired']} reaction={c['reaction']} "
                         f"({_short(c['reactions'])}) boot={c['boot_verdict']} {row.seconds:.1f}s: {row.reason}")
        else:
            neg = c["negotiated"]
            keys = ("ring-page-order", "queues", "persistent", "max-indirect-segments", "sector-size", "discard",
                    "read-only")
            lines.append(f"{row.verdict:<5} {row.name:<44} negotiated[{_short({k: neg.get(k) for k in keys})}] "
                         f"requests[{_short(c['requests'])}] violations={sum(c['violations'].values())} "
                         f"boot={c['boot_verdict']} {row.seconds:.1f}s")
    return lines
