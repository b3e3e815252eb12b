"""Helpers the host tests share, importable (`import support`) by test modules and conftest.py.

Owns: `start_grantd` (a grantd of its own in a short directory, checked to leave nothing
behind), `short_tmpdir` (unix socket paths hold 107 bytes: tmp_path is too long), and `Peer`
(a domain in another process: a small script driven by one JSON object per line on
stdin/stdout, so that memory and event channels really cross process boundaries), and
`stopped` (a process held stopped, every thread of it, for the length of a block).
Must not: define pytest fixtures (tests/conftest.py does, on these helpers) or import
anything from a test module.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from xentools.platform.sim.launcher import GRANTD_MODULE
from xentools.platform.sim.platform import GRANTD_SOCKET
from xentools.platform.sim.service import start_service


@contextlib.contextmanager
def short_tmpdir(prefix: str) -> Iterator[str]:
    """A fresh directory under /tmp with a short name, removed afterwards."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def start_grantd() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A running grantd whose socket is GRANTD_SOCKET in a fresh short directory: yields
    (directory, process). On exit it must stop on SIGTERM with status 0, remove its socket,
    and leave the directory empty (os.rmdir fails on anything left behind)."""
    d = tempfile.mkdtemp(prefix="xt-gnt-", dir="/tmp")
    sock = os.path.join(d, GRANTD_SOCKET)
    grantd = start_service("grantd", GRANTD_MODULE, sock)
    try:
        yield d, grantd.proc
    finally:
        grantd.stop(timeout=10)
        assert grantd.proc.returncode == 0
        assert not os.path.exists(sock)
        os.rmdir(d)


class Peer:
    """Another domain in another process: `python -c script *args`, which prints
    {"ready": true} and then answers each JSON command line with one JSON line
    ({"error": ..., "message": ...} when the command raised)."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self._line() == {"ready": True}

    def _line(self) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        assert ready, "peer did not answer"
        line = self.proc.stdout.readline()
        assert line, f"peer exited with {self.proc.wait()}"
        return json.loads(line)

    def send(self, **cmd: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def call(self, **cmd: object) -> dict:
        self.send(**cmd)
        out = self._line()
        if "error" in out:
            raise AssertionError(f"peer failed: {out}")
        return out

    def call_error(self, **cmd: object) -> dict:
        self.send(**cmd)
        out = self._line()
        assert "error" in out, out
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None and not f.closed:
                f.close()


@contextlib.contextmanager
def stopped(pid: int, timeout: float = 10.0) -> Iterator[None]:
    """Process `pid` stopped (SIGSTOP) until the block ends (SIGCONT). kill() returns before
    the signal has stopped threads running on another CPU (a ring thread watching its event
    word serves meanwhile), so this waits until /proc says every thread is stopped."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/stat", "rb") as f:
                    stat = f.read()
                    states.append(stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3])
            if all(state in (b"T", b"t", b"Z") for state in states):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"process {pid} not stopped {timeout} s after SIGSTOP: {states}")
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
