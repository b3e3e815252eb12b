"""`xentools sim start`: a whole software Xen in the foreground, used by Xen's C tools."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest


def _wait_for(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def sim_dir(tmp_path):
    root = tmp_path / "sim"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xentools", "sim", "start", "--sim-dir", str(root), "--domid", "5"],
        stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(str(root / "xenstored.sock.d5"))
        _wait_for(str(root / "grantd.sock"))
        yield root, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        proc.stderr.close()


def _tool(root, sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(args[0])
    assert exe, f"{args[0]} missing: install Debian's xenstore-utils (make does when root)"
    env = dict(os.environ, XENSTORED_PATH=str(root / sock))
    return subprocess.run([exe, *args[1:]], env=env, capture_output=True, text=True, timeout=20)


def test_c_tools_as_dom0_and_domu(sim_dir):
    root, _ = sim_dir
    assert _tool(root, "xenstored.sock", "xenstore-write", "/local/domain/5/data/x", "42").returncode == 0
    # The domU owns its own subtree (the launcher made /local/domain/5 owned by 5).
    as_domu = _tool(root, "xenstored.sock.d5", "xenstore-read", "/local/domain/5/data/x")
    assert (as_domu.returncode, as_domu.stdout.strip()) == (0, "42")
    # ... but cannot read dom0's nodes.
    assert _tool(root, "xenstored.sock.d5", "xenstore-read", "/local/domain/0/domid").returncode != 0


def test_sigterm_stops_everything_and_removes_sockets(sim_dir):
    root, proc = sim_dir
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not any(name.endswith(".sock") or ".sock." in name for name in os.listdir(root))


def test_old_spellings_are_accepted_and_wait_returns_when_ready(tmp_path):
    root = tmp_path / "old"
    proc = subprocess.Popen([sys.executable, "-m", "xentools", "sim", "start", "--dir", str(root), "--domain", "6"],
                            stderr=subprocess.DEVNULL)
    try:
        waited = subprocess.run([sys.executable, "-m", "xentools", "sim", "wait", "--sim-dir", str(root)],
                                capture_output=True, text=True, timeout=60)
        assert waited.returncode == 0, waited.stderr
        assert "domains [0, 6]" in waited.stderr
        assert os.path.exists(root / "xenstored.sock.d6")  # ready means every domain is there
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert not os.path.exists(root / "ready")
    shown = subprocess.run([sys.executable, "-m", "xentools", "sim", "start", "--help"],
                           capture_output=True, text=True, timeout=60).stdout
    assert "--sim-dir" in shown and "--domid" in shown and "--dir " not in shown and "--domain" not in shown


def test_nothing_running_names_the_fix(tmp_path):
    root = tmp_path / "none"
    waited = subprocess.run([sys.executable, "-m", "xentools", "sim", "wait", "--sim-dir", str(root),
                             "--timeout", "0.2"], capture_output=True, text=True, timeout=60)
    assert waited.returncode == 1 and waited.stderr.count("\n") == 1
    assert f"xentools sim start --sim-dir {root}" in waited.stderr
    for args in (["blk", "info", "--domid", "1"], ["vbd", "destroy", "--domid", "1"]):
        proc = subprocess.run([sys.executable, "-m", "xentools", *args, "--sim-dir", str(root)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert f"no software Xen at {root}: start one with `xentools sim start --sim-dir {root}" in proc.stderr


def test_missing_domain_names_the_fix(sim_dir):
    root, _ = sim_dir
    proc = subprocess.run([sys.executable, "-m", "xentools", "blk", "info", "--domid", "7", "--sim-dir", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert f"the software Xen at {root} has no domain 7: start it with " \
           f"`xentools sim start --sim-dir {root} --domid 7`" in proc.stderr
