"""SoftwarePlatform: one domain's view of the software Xen running under a root directory.

Owns: the layout of the root directory (grantd.sock, xenstored.sock, xenstored.sock.d<N>),
the Platform implementation that opens grant, event channel and xenstore handles there.
Must not: start services (launcher.py does), or know anything about blkif.

The full barrier is xentools.platform.barrier's, the same as on real Xen.
"""

from __future__ import annotations

import os

from xentools.platform import barrier
from xentools.platform.interface import Platform, PlatformError
from xentools.platform.sim.evtchn import SoftwareEventChannels
from xentools.platform.sim.grants import SoftwareGrantMapper, SoftwareGrantSharer
from xentools.platform.xenstore import XenstoreClient

GRANTD_SOCKET = "grantd.sock"
XENSTORED_SOCKET = "xenstored.sock"

def xenstored_socket_path(root_dir: str, domid: int) -> str:
    """The xenstored socket a domain connects to: the dom0 socket, or the one per domU."""
    path = os.path.join(root_dir, XENSTORED_SOCKET)
    return path if domid == 0 else f"{path}.d{domid}"


class SoftwarePlatform(Platform):
    """Domain `domid` of the software Xen whose sockets live in `root_dir`."""

    name = "software"

    def __init__(self, root_dir: str, domid: int) -> None:
        if not isinstance(domid, int) or not 0 <= domid < 0x7FF0:
            raise PlatformError(f"sim.bad_domid: {domid!r} is not a domain id")
        self.root_dir = root_dir
        self.domid = domid
        self.grantd_path = os.path.join(root_dir, GRANTD_SOCKET)
        self.xenstored_path = xenstored_socket_path(root_dir, domid)
        self.full_barrier = barrier.full_barrier()

    def open_gntshr(self) -> SoftwareGrantSharer:
        return SoftwareGrantSharer(self.grantd_path, self.domid)

    def open_gnttab(self) -> SoftwareGrantMapper:
        return SoftwareGrantMapper(self.grantd_path, self.domid)

    def open_evtchn(self) -> SoftwareEventChannels:
        return SoftwareEventChannels(self.grantd_path, self.domid)

    def open_xenstore(self, timeout: float = 10.0) -> XenstoreClient:
        return XenstoreClient.connect(self.xenstored_path, timeout=timeout)

    def __repr__(self) -> str:
        return f"SoftwarePlatform(root_dir={self.root_dir!r}, domid={self.domid})"
