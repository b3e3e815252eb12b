"""XenPlatform in dom0: identity, barrier, and that it really is Xen.

Owns: checks of XenPlatform's own attributes against what dom0 sees.
"""

from __future__ import annotations

import subprocess

from xentools.platform.barrier import full_barrier


def test_dom0_identity(platform):
    assert platform.name == "xen"
    assert platform.dom0 is True
    assert platform.domid == 0


def test_xen_is_4_17():
    out = subprocess.run(["xl", "info"], check=True, capture_output=True, text=True, timeout=60).stdout
    version = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("xen_version"))
    assert version.startswith("4.17"), version


def test_full_barrier_exists_and_runs(platform):
    barrier = full_barrier()
    assert barrier is not None, "dom0 is x86-64: the mfence barrier must be available"
    assert platform.full_barrier is barrier
    for _ in range(1000):
        barrier()
