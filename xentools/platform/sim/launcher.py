"""Starting and stopping a whole software Xen: xenstored and grantd as child processes.

Owns: SoftwareXen (a context manager that runs both services under a root directory,
introduces the domUs to xenstored and hands out SoftwarePlatform objects) and
run_software_xen() (the same in the foreground until SIGTERM, for `xentools sim start`).
Must not: implement either service or how one is started and waited for (service.py does),
or need root: everything lives in one directory of unix sockets (and the services' logs).

Layout of the root directory: grantd.sock, xenstored.sock, xenstored.sock.d<N> per domU
(created by xenstored on INTRODUCE), grantd.log and xenstored.log (the services' stderr).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from xentools.platform.interface import PlatformError
from xentools.platform.sim.platform import (
    GRANTD_SOCKET,
    XENSTORED_SOCKET,
    SoftwarePlatform,
    xenstored_socket_path,
)
from xentools.platform.sim.service import Service

GRANTD_MODULE = "xentools.platform.sim.grantd"
XENSTORED_MODULE = "xentools.platform.sim.xenstored"
# sockaddr_un.sun_path holds 108 bytes; keep the root short enough for xenstored.sock.d32751.
_MAX_ROOT_LEN = 80


class SoftwareXen:
    """A running software Xen: xenstored and grantd under `root_dir`, `domains` introduced.

    With root_dir None a fresh temporary directory is made and removed on stop(); a given
    root_dir is created if needed and kept (with the services' logs), only the sockets go.
    Use as a context manager, or call start() and stop().
    """

    def __init__(
        self,
        root_dir: str | None = None,
        domains: Sequence[int] = (0,),
        *,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self._given_root = root_dir
        self.root_dir = root_dir or ""
        self.domains: list[int] = []
        self._wanted = list(domains)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._services: list[Service] = []
        self._own_root = False
        self._lock = threading.Lock()

    # -- paths -----------------------------------------------------------------------------

    @property
    def grantd_path(self) -> str:
        return os.path.join(self.root_dir, GRANTD_SOCKET)

    @property
    def xenstored_path(self) -> str:
        return os.path.join(self.root_dir, XENSTORED_SOCKET)

    @property
    def pids(self) -> list[int]:
        """Process ids of the running services (xenstored, grantd)."""
        return [s.proc.pid for s in self._services]

    @property
    def service_pids(self) -> dict[str, int]:
        """Process id of each running service by name ("xenstored", "grantd")."""
        return {s.name: s.proc.pid for s in self._services}

    # -- lifetime --------------------------------------------------------------------------

    def start(self) -> SoftwareXen:
        if self._services:
            raise PlatformError("sim.already_started: this SoftwareXen is running")
        if self._given_root is None:
            base = tempfile.gettempdir()
            if len(base) > _MAX_ROOT_LEN - 30:
                base = "/tmp"
            self.root_dir = tempfile.mkdtemp(prefix="xentools-sim-", dir=base)
            self._own_root = True
        else:
            self.root_dir = os.path.abspath(self._given_root)
            if len(self.root_dir) > _MAX_ROOT_LEN:
                raise PlatformError(
                    f"sim.root_too_long: {self.root_dir!r} leaves no room for socket names "
                    f"(unix socket paths hold 107 bytes)"
                )
            os.makedirs(self.root_dir, exist_ok=True)
        try:
            deadline = time.monotonic() + self.start_timeout
            for name, module, sock in (
                ("xenstored", XENSTORED_MODULE, self.xenstored_path),
                ("grantd", GRANTD_MODULE, self.grantd_path),
            ):
                log = os.path.join(self.root_dir, f"{name}.log")
                self._services.append(Service(name, module, sock, log_path=log))
            for service in self._services:
                service.wait_ready(deadline)
            for domid in self._wanted:
                self.add_domain(domid)
        except BaseException:
            self.stop()
            raise
        return self

    def add_domain(self, domid: int) -> None:
        """Make `domid` a domain: /local/domain/<domid> owned by it, and for a domU an
        INTRODUCE so that xenstored serves it on xenstored.sock.d<domid>."""
        if not isinstance(domid, int) or not 0 <= domid < 0x7FF0:
            raise PlatformError(f"sim.bad_domid: {domid!r} is not a domain id")
        with self._lock:
            if domid in self.domains:
                return
            xs = SoftwarePlatform(self.root_dir, 0).open_xenstore(timeout=self.start_timeout)
            try:
                path = f"/local/domain/{domid}"
                # As the toolstack does before introducing a domain: its home directory,
                # owned by the domain itself (first permission entry = owner).
                xs.mkdir(path)
                xs.set_perms(path, [f"n{domid}"])
                xs.write(f"{path}/domid", str(domid))
                if domid != 0:
                    # No shared ring page and no event channel: the per-domain socket stands
                    # in for both, so mfn and port are 0.
                    xs.introduce(domid, 0, 0)
            finally:
                xs.close()
            if domid != 0 and not os.path.exists(xenstored_socket_path(self.root_dir, domid)):
                raise PlatformError(
                    f"sim.introduce: xenstored did not open a socket for domain {domid}"
                )
            self.domains.append(domid)

    def platform(self, domid: int) -> SoftwarePlatform:
        """Domain `domid`'s view of this software Xen (the domain must have been added)."""
        if domid not in self.domains:
            raise PlatformError(f"sim.unknown_domain: domain {domid} was not added")
        return SoftwarePlatform(self.root_dir, domid)

    def alive(self) -> bool:
        """True while both services run."""
        return bool(self._services) and all(s.alive() for s in self._services)

    def stop(self) -> None:
        """Stop both services (SIGTERM, then SIGKILL) and remove what was created."""
        services, self._services = self._services, []
        for service in reversed(services):  # grantd first, then xenstored
            service.stop(self.stop_timeout)
        self.domains.clear()
        self._cleanup_root([s for s in services if s.ready])

    def _cleanup_root(self, served: list[Service]) -> None:
        if not self.root_dir:
            return
        if self._own_root:
            shutil.rmtree(self.root_dir, ignore_errors=True)
            self._own_root = False
            return
        # A service killed with SIGKILL could not remove its sockets. Only sockets our own
        # services served are removed: a failed start must not touch another instance's.
        try:
            names = os.listdir(self.root_dir)
        except OSError:
            return
        for service in served:
            base = os.path.basename(service.socket_path)
            for name in names:
                if name == base or name.startswith(f"{base}.d"):
                    try:
                        os.unlink(os.path.join(self.root_dir, name))
                    except OSError:
                        pass

    def __enter__(self) -> SoftwareXen:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SoftwareXen(root_dir={self.root_dir!r}, domains={self.domains})"


def run_software_xen(
    root_dir: str,
    domains: Sequence[int] = (0,),
    *,
    on_ready: Callable[[SoftwareXen], None] | None = None,
) -> None:
    """Run a software Xen under `root_dir` in the foreground until SIGTERM or SIGINT.

    `on_ready` is called once both services accept connections. Raises PlatformError if a
    service dies on its own. Must be called from the main thread (it installs signal handlers).
    """
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        with SoftwareXen(root_dir, domains) as xen:
            if on_ready is not None:
                on_ready(xen)
            while not stop.wait(0.2):
                if not xen.alive():
                    raise PlatformError("sim.service_died: a software Xen service exited")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
