"""The conformance report: for each frontend a backend met, what it did and which rules of the
blkif protocol it broke.

Owns: `ConformanceReport` (thread-safe, one per backend; as a dict or JSON, written
atomically to a file) and `FrontendLog`, the handle one frontend's connection and queues
record into: violations (rule -> count and the first message), requests that passed the
checks (by operation, direct or indirect, with their segments and bytes) and requests
answered without I/O, the features of each connection, connects and disconnects, the
rules exercised, and how the session ended.
Must not: decide what a violation is (blkback_validate.py, blkif.py, ring.py, features.py
and xenbus.py raise the errors whose `rule` is counted here), judge requests, or print.

A frontend is named by its xenstore directory (/local/domain/<domid>/device/vbd/<devid>)
and appears from the moment the backend knows it, whether it connected or not, so "clean"
always comes with "N requests checked" (a frontend that never connected shows 0 connects).

Rules exercised: a rule's count is the number of times the backend applied it and the
frontend passed (or broke) it. For requests it is derived from what was accepted: each
kind of request (operation, direct or indirect, with data or not) passes a fixed list of
checks (REQUEST_RULES, the checks blkback_validate and the queue make, in that order); a
request answered without I/O counts its broken rule. For the handshake, each connection
counts the transport checks (HANDSHAKE_RULES) and each state the frontend wrote counts
"xenbus.backend.transition" and "state.malformed".

The JSON (schema 2):
{"schema": 2, "backend": path, "total": violations, "requests": checked, "ended": why,
 "frontends": {frontend: {"connects", "disconnects", "features", "ended",
   "requests": {"checked", "accepted", "rejected",
                "by_operation": {op: {"direct", "indirect", "rejected", "segments", "bytes"}}},
   "segments", "bytes", "rules_exercised": {rule: n}, "total",
   "violations": {rule: n}, "first": {rule: message}}}}
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from xentools.core.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
)

__all__ = [
    "HANDSHAKE_RULES", "OPERATIONS", "REQUEST_RULES", "SCHEMA", "STATE_RULES", "ConformanceReport", "FrontendLog",
]

SCHEMA = 2
_MAX_EXAMPLE = 300  # characters kept of the first message of each rule

OPERATIONS = {
    BLKIF_OP_READ: "read",
    BLKIF_OP_WRITE: "write",
    BLKIF_OP_FLUSH_DISKCACHE: "flush",
    BLKIF_OP_WRITE_BARRIER: "barrier",
    BLKIF_OP_DISCARD: "discard",
}

_FIRST = ("ring.req_overflow", "request.op")
_SEGMENTS = ("segment.last_sect", "segment.first_sect", "request.beyond_disk", "segment.gref_unmappable")
_INDIRECT = ("indirect.not_advertised", "indirect.op", "indirect.nr_segments", "indirect.too_many_segments")
# (operation name, indirect, carries data) -> the checks such a request passed to be accepted.
REQUEST_RULES: dict[tuple[str, bool, bool], tuple[str, ...]] = {
    ("read", False, True): (*_FIRST, "request.nr_segments", *_SEGMENTS),
    ("write", False, True): (*_FIRST, "request.nr_segments", "request.readonly_write", *_SEGMENTS),
    ("flush", False, False): (*_FIRST, "request.flush_not_advertised", "request.nr_segments"),
    ("flush", False, True): (*_FIRST, "request.flush_not_advertised", "request.nr_segments",
                             "request.readonly_write", *_SEGMENTS),
    ("barrier", False, False): (*_FIRST, "request.barrier_not_advertised", "request.nr_segments"),
    ("barrier", False, True): (*_FIRST, "request.barrier_not_advertised", "request.nr_segments",
                               "request.readonly_write", *_SEGMENTS),
    ("discard", False, False): (*_FIRST, "discard.not_advertised", "discard.flag", "request.readonly_write",
                                "discard.secure_not_advertised", "discard.range", "discard.beyond_disk"),
    ("read", True, True): (*_FIRST, *_INDIRECT, "indirect.gref_unmappable", *_SEGMENTS),
    ("write", True, True): (*_FIRST, *_INDIRECT, "request.readonly_write", "indirect.gref_unmappable", *_SEGMENTS),
}
# Checked on every connection (FrontendRingInfo parsed and validated, rings mapped, ports bound).
HANDSHAKE_RULES = (
    "frontend.ring-ref", "frontend.event-channel", "frontend.ring-page-order",
    "frontend.ring-page-order.range", "frontend.multi-queue-num-queues.range", "frontend.protocol.unknown",
    "frontend.ring-ref.unmappable", "frontend.event-channel.unbindable",
)
STATE_RULES = ("state.malformed", "xenbus.backend.transition")


def _op_name(op: int) -> str:
    return OPERATIONS.get(op, f"op {op}")


class _Frontend:
    """Everything recorded about one frontend (guarded by the report's lock)."""

    def __init__(self) -> None:
        self.violations: dict[str, int] = {}
        self.first: dict[str, str] = {}
        # (op name, indirect, with data) -> [requests, segments, bytes]
        self.accepted: dict[tuple[str, bool, bool], list[int]] = {}
        self.rejected: dict[str, int] = {}
        self.checked: dict[str, int] = {}
        self.connects = 0
        self.disconnects = 0
        self.features: dict[str, Any] = {}
        self.ended: str | None = None

    def as_dict(self) -> dict[str, Any]:
        by_op: dict[str, dict[str, int]] = {}
        rules = dict(self.checked)
        segments = 0
        moved = {"read": 0, "written": 0, "discarded": 0}
        accepted = 0
        for (name, indirect, data), (count, segs, nbytes) in self.accepted.items():
            entry = by_op.setdefault(name, {"direct": 0, "indirect": 0, "rejected": 0, "segments": 0, "bytes": 0})
            entry["indirect" if indirect else "direct"] += count
            entry["segments"] += segs
            entry["bytes"] += nbytes
            accepted += count
            segments += segs
            if name == "read":
                moved["read"] += nbytes
            elif name == "discard":
                moved["discarded"] += nbytes
            else:
                moved["written"] += nbytes
            for rule in REQUEST_RULES.get((name, indirect, data), _FIRST):
                rules[rule] = rules.get(rule, 0) + count
        rejected = 0
        for name, count in self.rejected.items():
            entry = by_op.setdefault(name, {"direct": 0, "indirect": 0, "rejected": 0, "segments": 0, "bytes": 0})
            entry["rejected"] += count
            rejected += count
        for rule, count in self.violations.items():
            rules[rule] = rules.get(rule, 0) + count
        return {
            "connects": self.connects,
            "disconnects": self.disconnects,
            "features": dict(sorted(self.features.items())),
            "ended": self.ended if self.ended is not None else ("never connected" if not self.connects else None),
            "requests": {
                "checked": accepted + rejected,
                "accepted": accepted,
                "rejected": rejected,
                "by_operation": dict(sorted(by_op.items())),
            },
            "segments": segments,
            "bytes": moved,
            "rules_exercised": dict(sorted(rules.items())),
            "total": sum(self.violations.values()),
            "violations": dict(sorted(self.violations.items())),
            "first": dict(sorted(self.first.items())),
        }


class FrontendLog:
    """What one frontend did, recorded into its backend's report. Safe from any thread."""

    __slots__ = ("_report", "_lock", "_accepted", "frontend")

    def __init__(self, report: ConformanceReport, frontend: str) -> None:
        self._report = report
        self._lock = report._lock
        with self._lock:
            self._accepted = report._entry(frontend).accepted  # the hot path's table
        self.frontend = frontend

    def record(self, rule: str, message: str) -> None:
        """Count one violation of `rule`; `message` is kept if it is the rule's first."""
        self._report.record(self.frontend, rule, message)

    def accepted(self, wire_op: int, op: int, segments: int, nbytes: int, count: int = 1) -> None:
        """A request passed every check before its I/O: `wire_op` as on the ring (INDIRECT
        for an indirect one), `op` what it does, its data `segments` and `nbytes` (the
        extent it reads, writes or discards). Called once per request: kept cheap. `count`
        > 1: that many requests of one kind, with their segments and bytes summed (the
        compiled ring loop reports a batch at once)."""
        key = (OPERATIONS.get(op) or _op_name(op), wire_op == BLKIF_OP_INDIRECT, segments > 0)
        with self._lock:
            counts = self._accepted.get(key)
            if counts is None:
                self._accepted[key] = [count, segments, nbytes]
            else:
                counts[0] += count
                counts[1] += segments
                counts[2] += nbytes

    def rejected(self, op: int) -> None:
        """A request of operation `op` was answered without I/O (its rule is record()ed)."""
        with self._report._lock:
            rejected = self._report._entry(self.frontend).rejected
            name = _op_name(op)
            rejected[name] = rejected.get(name, 0) + 1

    def checked(self, *rules: str) -> None:
        """The frontend passed each of `rules` once more (handshake and state checks)."""
        with self._report._lock:
            checked = self._report._entry(self.frontend).checked
            for rule in rules:
                checked[rule] = checked.get(rule, 0) + 1

    def connected(self, features: dict[str, Any]) -> None:
        """A connection was made with these negotiated `features` (the transport checks of
        HANDSHAKE_RULES passed)."""
        with self._report._lock:
            entry = self._report._entry(self.frontend)
            entry.connects += 1
            entry.features = dict(features)
            entry.ended = None
        self.checked(*HANDSHAKE_RULES)

    def disconnected(self, why: str) -> None:
        """A connection ended (rings unmapped, ports unbound) because of `why`."""
        with self._report._lock:
            entry = self._report._entry(self.frontend)
            entry.disconnects += 1
            entry.ended = why

    def ended(self, why: str) -> None:
        """How the session with this frontend ended (the last word wins)."""
        with self._report._lock:
            self._report._entry(self.frontend).ended = why


class ConformanceReport:
    """Every frontend a backend met, what it did and the rules it broke."""

    def __init__(self, backend: str = "") -> None:
        self.backend = backend
        self.ended: str | None = None  # why the backend stopped serving
        # Extra top-level sections: name -> function giving its JSON value (e.g. "faults").
        self.sections: dict[str, Callable[[], Any]] = {}
        self._lock = threading.Lock()
        self._frontends: dict[str, _Frontend] = {}

    def _entry(self, frontend: str) -> _Frontend:
        entry = self._frontends.get(frontend)
        if entry is None:
            entry = self._frontends[frontend] = _Frontend()
        return entry

    def frontend(self, frontend: str) -> FrontendLog:
        """The log of `frontend`, which appears in the report from now on."""
        return FrontendLog(self, frontend)

    def record(self, frontend: str, rule: str, message: str) -> None:
        with self._lock:
            entry = self._entry(frontend)
            entry.violations[rule] = entry.violations.get(rule, 0) + 1
            if rule not in entry.first:
                entry.first[rule] = message[:_MAX_EXAMPLE]

    def violations(self) -> dict[str, dict[str, int]]:
        """frontend -> rule -> count (a copy) of the frontends that broke a rule."""
        with self._lock:
            return {
                fe: dict(sorted(entry.violations.items()))
                for fe, entry in sorted(self._frontends.items()) if entry.violations
            }

    def total(self) -> int:
        """Violations of every frontend."""
        with self._lock:
            return sum(sum(entry.violations.values()) for entry in self._frontends.values())

    def as_dict(self) -> dict[str, Any]:
        """The report (schema in the module docstring)."""
        with self._lock:
            frontends = {fe: entry.as_dict() for fe, entry in sorted(self._frontends.items())}
            ended = self.ended
        return {
            "schema": SCHEMA,
            "backend": self.backend,
            "total": sum(fe["total"] for fe in frontends.values()),
            "requests": sum(fe["requests"]["checked"] for fe in frontends.values()),
            "ended": ended,
            "frontends": frontends,
            **{name: section() for name, section in sorted(self.sections.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    def write(self, path: str) -> None:
        """Write the JSON report to `path` atomically (a reader never sees half a file)."""
        text = self.to_json() + "\n"
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".blkback-report-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
