"""The conformance report: how often each frontend broke each rule of the blkif protocol.

Owns: `ConformanceReport` (thread-safe counters frontend -> rule -> count, plus the first
message seen for each rule, as a dict or JSON, written atomically to a file) and
`FrontendLog`, the handle one connection's queues record into.
Must not: decide what a violation is (blkback_validate.py, blkif.py, ring.py, features.py
and xenbus.py raise the errors whose `rule` is counted here) or print anything.

A frontend is named by its xenstore directory (/local/domain/<domid>/device/vbd/<devid>).
A frontend that broke no rule does not appear at all, so a clean run reports
{"frontends": {}}: the tool a driver author runs and reads.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

__all__ = ["ConformanceReport", "FrontendLog"]

_MAX_EXAMPLE = 300  # characters kept of the first message of each rule


class FrontendLog:
    """Records violations of one frontend into its report."""

    __slots__ = ("_report", "frontend")

    def __init__(self, report: ConformanceReport, frontend: str) -> None:
        self._report = report
        self.frontend = frontend

    def record(self, rule: str, message: str) -> None:
        """Count one violation of `rule`; `message` is kept if it is the rule's first."""
        self._report.record(self.frontend, rule, message)


class ConformanceReport:
    """Violations per frontend and rule, for one backend."""

    def __init__(self, backend: str = "") -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._first: dict[str, dict[str, str]] = {}

    def frontend(self, frontend: str) -> FrontendLog:
        return FrontendLog(self, frontend)

    def record(self, frontend: str, rule: str, message: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(frontend, {})
            counts[rule] = counts.get(rule, 0) + 1
            first = self._first.setdefault(frontend, {})
            if rule not in first:
                first[rule] = message[:_MAX_EXAMPLE]

    def violations(self) -> dict[str, dict[str, int]]:
        """frontend -> rule -> count (a copy); empty when every frontend was clean."""
        with self._lock:
            return {fe: dict(sorted(rules.items())) for fe, rules in sorted(self._counts.items())}

    def total(self) -> int:
        with self._lock:
            return sum(sum(rules.values()) for rules in self._counts.values())

    def as_dict(self) -> dict[str, Any]:
        """{"backend": path, "total": n, "frontends": {frontend: {"violations": {rule: count},
        "first": {rule: message}}}}."""
        with self._lock:
            frontends = {
                fe: {
                    "violations": dict(sorted(rules.items())),
                    "first": dict(sorted(self._first.get(fe, {}).items())),
                }
                for fe, rules in sorted(self._counts.items())
            }
            total = sum(sum(rules.values()) for rules in self._counts.values())
        return {"backend": self.backend, "total": total, "frontends": frontends}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    def write(self, path: str) -> None:
        """Write the JSON report to `path` atomically (a reader never sees half a file)."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".blkback-report-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json() + "\n")
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
