"""The results of a boot test: `BootResult`, its JSON report and its JUnit XML.

Owns: the report's fields and their JSON form (schema 1), and the JUnit XML document
(one testsuite, one testcase; a failure or error element when the verdict is not pass).
A boot against a faulty backend (--fault) carries a `fault` section (matrix.fault_section):
its verdict is then the outcome, and the JUnit case names the fault and the reaction.
Must not: run anything or decide a verdict; it writes what boottest decided.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xentools.tools.images.verdict import Decision, Outcome, Verdict

__all__ = ["BootResult", "junit_xml", "write_reports"]

REPORT_SCHEMA = 1
CONSOLE_TAIL = 64 * 1024
# XML 1.0 forbids most control characters even when escaped.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class BootResult:
    """Everything a boot test produced. `outcome` is the verdict's, except that a pass whose
    guest could not be destroyed is an error (a guest left running is the test's fault)."""

    name: str
    image: str
    image_format: str
    profile: str
    guest_type: str
    backend: str
    console_mode: str
    decision: Decision
    started_at: str
    duration: float
    timeouts: Mapping[str, float]
    files: Mapping[str, str]
    domid: int | None = None
    destroyed: bool = False
    cleanup_errors: tuple[str, ...] = ()
    disk_report: Mapping[str, object] | None = None
    xl_create_output: str = ""
    # Seconds per step of the run, in order (create, disk_start, unpause, guest, ..., disk_stop).
    phases: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Seconds from unpause to each boot milestone seen: firmware (its first line in Xen's
    # log), bootloader (first console byte), kernel, blkfront_connected, verdict.
    milestones: Mapping[str, float] = field(default_factory=dict)
    # Xen's log lines about the domain (HVM/PVH): firmware output, Xen's crash reports.
    xen_log: tuple[str, ...] = ()
    # --fault: the faults, the guest's reaction and the verdict (matrix.fault_section).
    fault: Mapping[str, object] | None = None

    @property
    def outcome(self) -> Outcome:
        if self.fault is not None:
            return _FAULT_OUTCOMES[str(self.fault["verdict"])]
        if self.cleanup_errors and self.decision.verdict is Verdict.PASS:
            return Outcome.ERROR
        return self.decision.outcome

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code

    def to_json(self) -> dict[str, object]:
        d = self.decision
        return {
            "schema": REPORT_SCHEMA,
            "tool": "xentools image boot-test",
            "name": self.name,
            "image": self.image,
            "image_format": self.image_format,
            "profile": self.profile,
            "guest_type": self.guest_type,
            "backend": self.backend,
            "console": self.console_mode,
            "verdict": d.verdict.value,
            "outcome": self.outcome.label,
            "exit_code": self.exit_code,
            "reason": d.reason,
            "matched_line": d.line,
            "matched_line_no": d.line_no,
            "matched_pattern": d.pattern,
            "elapsed_s": round(d.elapsed, 3),
            "started_at": self.started_at,
            "duration_s": round(self.duration, 3),
            "phases_s": dict(self.phases),
            "milestones_s": dict(self.milestones),
            "timeouts_s": dict(self.timeouts),
            "domid": self.domid,
            "destroyed": self.destroyed,
            "cleanup_errors": list(self.cleanup_errors),
            "disk_backend_report": dict(self.disk_report) if self.disk_report is not None else None,
            "xl_create_output": self.xl_create_output,
            "files": dict(self.files),
            "notes": list(self.notes),
            "xen_log": list(self.xen_log),
            "fault": dict(self.fault) if self.fault is not None else None,
        }

    def summary(self) -> str:
        """The decision in one line; with --fault, the fault's verdict and reason."""
        if self.fault is not None:
            return (f"fault {', '.join(map(str, self.fault['specs']))}: {self.fault['reason']} "  # type: ignore[call-overload]
                    f"(boot verdict {self.decision.verdict.value})")
        return self.decision.summary()


_FAULT_OUTCOMES = {"pass": Outcome.PASS, "fail": Outcome.FAIL, "error": Outcome.ERROR}


def _xml_text(text: str) -> str:
    return _XML_BAD.sub("\ufffd", text)


def junit_xml(result: BootResult, console_tail: str = "") -> bytes:
    """A JUnit XML document with one test case named after the image."""
    d = result.decision
    outcome = result.outcome
    suite = ET.Element("testsuite", {
        "name": "xentools.image.boot-test",
        "tests": "1",
        "failures": "1" if outcome in (Outcome.FAIL, Outcome.TIMEOUT) else "0",
        "errors": "1" if outcome is Outcome.ERROR else "0",
        "skipped": "0",
        "time": f"{result.duration:.3f}",
        "timestamp": result.started_at,
    })
    props = ET.SubElement(suite, "properties")
    for key, value in (("verdict", d.verdict.value), ("outcome", outcome.label), ("image", result.image),
                       ("profile", result.profile), ("guest_type", result.guest_type),
                       ("backend", result.backend), ("domain", result.name),
                       *((("fault", ", ".join(map(str, result.fault["specs"]))),  # type: ignore[call-overload]
                          ("reaction", str(result.fault["reaction"]))) if result.fault is not None else ())):
        ET.SubElement(props, "property", {"name": key, "value": _xml_text(value)})
    case = ET.SubElement(suite, "testcase", {
        "classname": f"boot-test.{result.profile}",
        "name": _xml_text(os.path.basename(result.image)),
        "time": f"{d.elapsed:.3f}",
    })
    if outcome is not Outcome.PASS:
        tag = "error" if outcome is Outcome.ERROR else "failure"
        message = result.summary()
        if result.cleanup_errors:
            message += "; " + "; ".join(result.cleanup_errors)
        kind = str(result.fault["reaction"]) if result.fault is not None else d.verdict.value
        elem = ET.SubElement(case, tag, {"type": kind, "message": _xml_text(message)})
        elem.text = _xml_text(message)
    if console_tail:
        ET.SubElement(case, "system-out").text = _xml_text(console_tail)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _console_tail(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - CONSOLE_TAIL))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def write_reports(result: BootResult) -> None:
    """Write the JSON report and the JUnit XML to the paths in `result.files`."""
    report = Path(result.files["report"])
    report.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    Path(result.files["junit"]).write_bytes(junit_xml(result, _console_tail(result.files.get("console_log"))))
