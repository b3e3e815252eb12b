"""One software Xen service process (grantd or xenstored), from both ends of its readiness pipe.

Owns: what both daemons do alike around their own loop: their command line (daemon_main():
`--socket PATH [--ready-fd N]`, an error as one line and exit status 1) and serve() (SIGTERM
and SIGINT stop the server, "READY\\n" goes to the ready descriptor once it accepts, it serves
until stopped, then it is closed and the signal handlers restored); and starting one as a
child process (Service, start_service(): `python -m MODULE --socket PATH --ready-fd N
[ARGS]`, waiting for the READY line, stopping with SIGTERM and then SIGKILL), its output to a
log file or to the parent's own stderr.
Must not: implement either service's protocol, choose where the services of a software Xen
live or which ones run (launcher.py does), or need root.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from xentools.core.errors import XentoolsError
from xentools.platform.interface import PlatformError

__all__ = ["READY", "Server", "Service", "daemon_main", "serve", "start_service"]

READY = b"READY\n"


class Server(Protocol):
    """What serve() needs of a service: a loop, a way to end it from a signal, a clean-up."""

    def serve_forever(self) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


def serve(server: Server, ready_fd: int | None = None) -> None:
    """Serve in the foreground until SIGTERM or SIGINT, then close `server` and return.

    The server must already accept connections: with `ready_fd`, READY is written there
    and the descriptor closed before serving. Signal handlers are installed (and restored
    afterwards) only when called from the main thread.
    """
    previous: dict[int, object] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, lambda *_: server.stop())
        if ready_fd is not None:
            try:
                os.write(ready_fd, READY)
            finally:
                os.close(ready_fd)
        server.serve_forever()
    finally:
        server.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def daemon_main(
    module: str,
    description: str,
    run: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None = None,
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """`python -m MODULE --socket PATH [--ready-fd N] [what add_arguments adds]`: run(args)
    serves (typically through serve()); an error it raises (ours, or the system's) is one
    line on stderr and exit status 1. Returns the exit status."""
    name = module.rpartition(".")[2]
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--ready-fd", type=int, default=None, help="write READY to this fd once listening")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        run(args)
    except (XentoolsError, OSError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1
    return 0


class Service:
    """One child process serving a unix socket, started with a --ready-fd pipe.

    Its stdout and stderr go to `log_path` (appended) or, with None, to this process's own.
    """

    def __init__(
        self,
        name: str,
        module: str,
        socket_path: str,
        *,
        log_path: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.socket_path = socket_path
        self.log_path = log_path
        ready_r, ready_w = os.pipe()
        try:
            with open(log_path, "ab") if log_path is not None else contextlib.nullcontext() as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", module, "--socket", socket_path,
                     "--ready-fd", str(ready_w), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(ready_w,),
                    close_fds=True,
                )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        self._ready_r = ready_r
        self.ready = False

    def wait_ready(self, deadline: float) -> None:
        """Wait for the READY line until `deadline` (time.monotonic()); raise PlatformError
        (with the log's tail) otherwise."""
        got = b""
        try:
            while b"\n" not in got:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PlatformError(
                        f"sim.timeout: {self.name} not ready on {self.socket_path} after "
                        f"waiting{self._log_tail()}"
                    )
                readable, _, _ = select.select([self._ready_r], [], [], left)
                if not readable:
                    continue
                chunk = os.read(self._ready_r, 64)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise PlatformError(
                        f"sim.service_died: {self.name} exited with status "
                        f"{self.proc.returncode} before it was ready{self._log_tail()}"
                    )
                got += chunk
        finally:
            os.close(self._ready_r)
        if got != READY:
            raise PlatformError(f"sim.bad_ready: {self.name} said {got!r}")
        self.ready = True

    def _log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-2000:].decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; its log says: {text}" if text else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL if it is still running after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_service(
    name: str,
    module: str,
    socket_path: str,
    *,
    timeout: float = 10.0,
    log_path: str | None = None,
    args: Sequence[str] = (),
) -> Service:
    """A Service that has said READY within `timeout` seconds; if it does not, it is killed
    and PlatformError says why."""
    service = Service(name, module, socket_path, log_path=log_path, args=args)
    try:
        service.wait_ready(time.monotonic() + timeout)
    except BaseException:
        service.stop(0)
        raise
    return service
