"""`xentools doctor`: what this host has for running blkif over real Xen, and what is missing.

Owns: the host checks (Xen version, /dev/xen nodes, driver modules, xenstore, grant limit,
Xen's libraries, root) and the fix printed for each missing piece.
Must not: change the host (it never loads modules or installs packages), or need Xen to run.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import click

SYS_HYPERVISOR = Path("/sys/hypervisor")
PROC_XEN_CAPS = Path("/proc/xen/capabilities")
DEV_XEN = Path("/dev/xen")
GNTALLOC_LIMIT = Path("/sys/module/xen_gntalloc/parameters/limit")

# device node -> the Linux module that provides it
DEVICE_MODULES = {
    "gntdev": "xen-gntdev",
    "gntalloc": "xen-gntalloc",
    "evtchn": "xen-evtchn",
    "privcmd": "xen-privcmd",
}
LIBRARIES = {"libxengnttab.so.1": "libxengnttab1", "libxenevtchn.so.1": "libxenevtchn1"}


@dataclass
class Check:
    name: str
    ok: bool
    found: str
    fix: str = ""
    required: bool = True


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _xen_version() -> Check:
    if _read(SYS_HYPERVISOR / "type") != "xen":
        return Check("xen", False, "not running on Xen (/sys/hypervisor/type is not 'xen')",
                     "boot this machine under Xen (dom0) or run in a Xen guest; "
                     "or use the software Xen: xentools sim start --dir DIR")
    parts = [_read(SYS_HYPERVISOR / "version" / f) or "?" for f in ("major", "minor", "extra")]
    return Check("xen", True, f"Xen {parts[0]}.{parts[1]}{parts[2]}")


def _domain() -> Check:
    caps = _read(PROC_XEN_CAPS)
    if caps is None:
        return Check("domain", False, f"{PROC_XEN_CAPS} absent",
                     "mount xenfs: mount -t xenfs xenfs /proc/xen (module xenfs)")
    return Check("domain", True, "dom0 (control_d)" if "control_d" in caps else "domU")


def _device(node: str, module: str) -> Check:
    path = DEV_XEN / node
    if path.exists():
        return Check(f"/dev/xen/{node}", True, "present")
    return Check(f"/dev/xen/{node}", False, "absent", f"modprobe {module}",
                 required=node != "privcmd")


def _xenbus_or_socket() -> Check:
    from xentools.platform.xenstore import XenstoreClient

    try:
        client = XenstoreClient.connect(None, timeout=3.0)
    except Exception as err:  # any failure to connect is a finding, not a crash
        return Check("xenstore", False, str(err),
                     "start xenstored (dom0: /usr/lib/xen-4.17/bin/xenstored) or mount xenfs")
    try:
        client.get_domain_path(0)
        return Check("xenstore", True, "reachable")
    except Exception as err:
        return Check("xenstore", False, f"connected but a request failed: {err}",
                     "check that xenstored runs")
    finally:
        client.close()


def _gntalloc_limit() -> Check:
    limit = _read(GNTALLOC_LIMIT)
    if limit is None:
        return Check("grant limit", False, "xen_gntalloc not loaded", "modprobe xen-gntalloc")
    fix = "" if int(limit) >= 1024 else "modprobe -r xen-gntalloc; modprobe xen-gntalloc limit=1024"
    return Check("grant limit", int(limit) >= 1024, f"{limit} grants per process (gntalloc)", fix)


def _library(soname: str, package: str) -> Check:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return Check(soname, False, "not loadable", f"apt-get install {package}")
    return Check(soname, True, "loadable")


def _root() -> Check:
    if os.geteuid() == 0:
        return Check("root", True, "running as root")
    return Check("root", False, f"running as uid {os.geteuid()}",
                 "run as root: /dev/xen/* and xenstored's socket need it")


def run_checks() -> list[Check]:
    checks = [_root(), _xen_version(), _domain()]
    checks += [_device(node, module) for node, module in DEVICE_MODULES.items()]
    checks += [_library(soname, pkg) for soname, pkg in LIBRARIES.items()]
    checks += [_gntalloc_limit(), _xenbus_or_socket()]
    return checks


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON on stdout.")
def doctor(as_json: bool) -> None:
    """Check this host for real Xen: version, /dev/xen, modules, xenstore, grant limit."""
    checks = run_checks()
    if as_json:
        click.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            mark = "ok" if c.ok else ("MISSING" if c.required else "optional")
            line = f"{mark:8} {c.name:20} {c.found}"
            if not c.ok and c.fix:
                line += f"\n{'':8} {'':20} fix: {c.fix}"
            click.echo(line)
    missing = [c.name for c in checks if c.required and not c.ok]
    if missing:
        click.echo(f"xentools: error: real Xen is not usable here: missing {', '.join(missing)}",
                   err=True)
        raise SystemExit(1)
