"""Choosing a platform: the software Xen when a simulation directory is given, else real Xen.

Owns: the one place that decides which Platform implementation a command or device gets.
Must not: be imported by xentools.core or by the platform implementations themselves.
"""

from __future__ import annotations

import os

from xentools.platform.interface import Platform, PlatformError

SIM_DIR_ENV = "XENTOOLS_SIM_DIR"


def open_platform(sim_dir: str | None = None, domid: int | None = None) -> Platform:
    """A Platform for `domid` on the software Xen rooted at `sim_dir` (or $XENTOOLS_SIM_DIR),
    or on the real Xen this process runs on when neither is set. On real Xen the domain is
    the one this process runs in; a different `domid` is refused."""
    sim_dir = sim_dir or os.environ.get(SIM_DIR_ENV)
    if sim_dir:
        from xentools.platform.sim.platform import SoftwarePlatform

        return SoftwarePlatform(sim_dir, 0 if domid is None else domid)
    from xentools.platform.xen.platform import XenPlatform

    platform = XenPlatform()
    if domid is not None and domid != platform.domid:
        raise PlatformError(f"real Xen: this process runs in domain {platform.domid}, not {domid}")
    return platform
