"""`xentools doctor`: what this host has for running blkif over real Xen, and what is missing.

Owns: the host checks (Xen version, dom0 or domU, /dev/xen nodes and access to them, driver
modules, xenstore, grant limit, Xen's libraries, root) and the fix printed for each missing
piece. In a domU (a userspace frontend's home) the needs differ: xenstore is reached through
/dev/xen/xenbus, grants come from gntalloc and gntdev is needed only to serve disks; and the
domU's vbds must carry the permissions the toolstack in dom0 gives (frontend directory owned
by this domain, backend directory readable by it), checked for every vbd under device/vbd/.
Must not: change the host (it never loads modules, installs packages or writes xenstore), or
need Xen to run.
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
# What dom0 must write for a vbd whose frontend is a program in a domU (README: "A vbd for a
# userspace frontend in a domU").
VBD_FIX = ("in dom0, write the vbd with this domain as the frontend: frontend directory owned by "
           "domain {domid}, backend directory readable by it (xentools vbd create --frontend-domid {domid})")
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


def is_domu() -> bool:
    """A domU: xenfs says so (no control_d), or without xenfs, no xenstored socket here."""
    from xentools.platform.xenstore import DEFAULT_SOCKET

    caps = _read(PROC_XEN_CAPS)
    if caps is not None:
        return "control_d" not in caps
    return not os.path.exists(DEFAULT_SOCKET)


def _domain(domu: bool) -> Check:
    caps = _read(PROC_XEN_CAPS)
    if caps is None and not domu:
        return Check("domain", False, f"{PROC_XEN_CAPS} absent",
                     "mount xenfs: mount -t xenfs xenfs /proc/xen (module xenfs)")
    if caps is None:
        return Check("domain", True, f"domU ({PROC_XEN_CAPS} absent: xenfs is not needed in a domU)")
    return Check("domain", True, "dom0 (control_d)" if "control_d" in caps else "domU")


def _device(node: str, module: str, required: bool = True) -> Check:
    path = DEV_XEN / node
    if not path.exists():
        return Check(f"/dev/xen/{node}", False, "absent", f"modprobe {module}", required=required)
    if not os.access(path, os.R_OK | os.W_OK):
        return Check(f"/dev/xen/{node}", False, "present, but this user may not open it read-write",
                     f"run as root, or give this user read-write access to {path} (a udev rule)",
                     required=required)
    return Check(f"/dev/xen/{node}", True, "present")


def _xenbus_device() -> Check:
    from xentools.platform.xen.platform import xenbus_fix
    from xentools.platform.xenstore import XENBUS_DEVICE, default_path

    path = default_path()
    fix = xenbus_fix(path)
    if fix:
        return Check("xenbus device", False, f"{path} not usable", fix)
    return Check("xenbus device", True, f"{path} (Linux's xenbus frontend)" if path == XENBUS_DEVICE
                 else path)


def _xenbus_or_socket() -> Check:
    from xentools.platform.xenstore import XenstoreClient

    try:
        client = XenstoreClient.connect(None, timeout=3.0)
    except Exception as err:  # any failure to connect is a finding, not a crash
        return Check("xenstore", False, str(err),
                     "start xenstored (dom0: /usr/lib/xen-4.17/bin/xenstored) or mount xenfs; "
                     "in a domU: /dev/xen/xenbus (devtmpfs)")
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


def _may(perms: list[str], domid: int, access: str) -> bool:
    """Whether `domid` may read ("r") or write ("w") a node with xenstore permissions
    `perms`: the first entry names the owner (who may do anything) and what every other
    domain may do; later entries give single domains their own letter ("b" = both)."""
    owner = perms[0]
    if int(owner[1:]) == domid:
        return True
    letter = next((p[0] for p in perms[1:] if int(p[1:]) == domid), owner[0])
    return letter in (access, "b")


def _vbd_checks() -> list[Check]:
    """Each vbd under this domU's device/vbd/: may it write its frontend directory and read
    the backend's? (What a userspace frontend needs; nothing is written.)"""
    from xentools.platform.interface import XenstoreError
    from xentools.platform.xenstore import XenstoreClient

    try:
        client = XenstoreClient.connect(None, timeout=3.0)
    except Exception:  # noqa: BLE001 - the xenstore check reports it
        return []
    checks = []
    try:
        domid = int(client.read("domid").decode())
        fix = VBD_FIX.format(domid=domid)
        try:
            devids = client.directory("device/vbd")
        except XenstoreError as err:
            if err.errno_name == "ENOENT":
                return [Check("vbds", True, "none under device/vbd/ yet", fix, required=False)]
            return [Check("vbds", False, f"device/vbd/ of domain {domid}: {err.errno_name or err}", fix)]
        for devid in sorted(devids):
            front = f"/local/domain/{domid}/device/vbd/{devid}"
            name = f"vbd {devid}"
            try:
                if not _may(client.get_perms(front), domid, "w"):
                    checks.append(Check(name, False, f"{front} is not writable by domain {domid}", fix))
                    continue
                backend = client.read(f"{front}/backend").decode()
                state = client.read(f"{backend}/state").decode()
            except XenstoreError as err:
                checks.append(Check(name, False, f"{front}: {str(err).split(';')[0]}", fix))
                continue
            checks.append(Check(name, True, f"frontend {front} writable, backend {backend} readable (state {state})"))
    except Exception as err:  # noqa: BLE001 - a finding, not a crash
        checks.append(Check("vbds", False, f"cannot list this domain's vbds: {err}", "check the xenstore finding"))
    finally:
        client.close()
    return checks


def run_checks() -> list[Check]:
    on_xen = _read(SYS_HYPERVISOR / "type") == "xen"
    domu = on_xen and is_domu()
    checks = [_root(), _xen_version(), _domain(domu)]
    for node, module in DEVICE_MODULES.items():
        # A frontend in a domU grants (gntalloc); mapping (gntdev) is for serving disks.
        required = node != "privcmd" and not (domu and node == "gntdev")
        checks.append(_device(node, module, required))
    if domu:
        checks.append(_xenbus_device())
    checks += [_library(soname, pkg) for soname, pkg in LIBRARIES.items()]
    checks += [_gntalloc_limit(), _xenbus_or_socket()]
    if domu:
        checks += _vbd_checks()
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
