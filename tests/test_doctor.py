"""`xentools doctor` on a host without Xen: every missing piece is named with its fix."""

from __future__ import annotations

import json
import subprocess
import sys

from xentools.tools import doctor


def test_doctor_without_xen_names_what_is_missing_and_fails():
    proc = subprocess.run([sys.executable, "-m", "xentools", "doctor", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert not checks["xen"]["ok"] and "software Xen" in checks["xen"]["fix"]
    assert checks["/dev/xen/gntdev"]["fix"] == "modprobe xen-gntdev"
    # One line on stderr, no traceback.
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("xentools: error: real Xen is not usable here: missing xen")


def test_grant_limit_below_linux_default_is_flagged(tmp_path, monkeypatch):
    limit = tmp_path / "limit"
    limit.write_text("512\n")
    monkeypatch.setattr(doctor, "GNTALLOC_LIMIT", limit)
    check = doctor._gntalloc_limit()
    assert (check.ok, check.found) == (False, "512 grants per process (gntalloc)")
    assert "limit=1024" in check.fix
