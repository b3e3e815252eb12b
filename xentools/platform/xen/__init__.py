"""Real Xen platform: Xen's own libraries (libxengnttab.so.1, libxenevtchn.so.1) via cffi.

Owns: the public names of the real-Xen implementation of xentools.platform.interface.
Must not: open a library or a device at import time; this package imports on machines
without Xen (the libraries are opened when a handle is first created).
"""

from xentools.platform.xen.platform import (
    EVTCHN_SONAME,
    GNTTAB_SONAME,
    GrantCopySegment,
    XenDirectLink,
    XenEventChannels,
    XenGrantMapper,
    XenGrantSharer,
    XenPlatform,
)

__all__ = [
    "EVTCHN_SONAME",
    "GNTTAB_SONAME",
    "GrantCopySegment",
    "XenDirectLink",
    "XenEventChannels",
    "XenGrantMapper",
    "XenGrantSharer",
    "XenPlatform",
]
