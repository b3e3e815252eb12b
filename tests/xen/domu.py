"""DOM0 SIDE of the domU tests: a PV domU that runs this repository's Python, and Xen's own
view of a domain's grants and event channels.

Owns:
- the domU's initramfs (tests/xen/guests.py build_initramfs, scenario "python"): besides
  busybox and the gntalloc and evtchn modules, the interpreter that runs these tests (the
  repository's .venv), every Python module the domU program imports (with its bytecode),
  and every shared library they load, each at the path dom0 has it (`python_files`: found
  by running that interpreter on the program's imports and reading its /proc/self/maps);
- the domU's xl.cfg and kernel command line (`domu_config`: 256 MiB by default, runs
  tests/xen/domu_guest.py with xentools.* parameters);
- `XenTables`: the hypervisor's grant table and event channel dumps (debug keys 'g' and 'e'
  read back with `xl dmesg`, the console ring cleared first so that it holds nothing else),
  parsed into the active grants (pinned: some domain maps them) and the bound ports of one
  domain: how dom0 checks that a backend let go of a domU's grants, independently of both;
- `acknowledge`: dom0's answer to the domU program's hand-over (domu_guest.ACK_NODE).
Must not: decide a verdict (the tests assert on what these return), or start Xen services.

Why an initramfs and not Xen 9pfs (xl.cfg p9=, QEMU in dom0 serving dom0's / over
9pnet_xen): both were measured in the nested Xen (2026-11-27, host load 5-8). Over 9pfs every
file Python opens or looks up costs a round trip domU -> QEMU in dom0 -> dom0's own virtio 9p
-> the host: `import xentools.devices.blkfront, xentools.platform.xen.platform` took 29 s
(cache=loose), against 6.8 s from the initramfs in the same domU; a whole start of the
program over 9pfs took over 100 s. 9pfs also costs a QEMU process per domU in dom0, and
its data rings keep hundreds of the domU's grants mapped, which overflowed Xen's console
ring when dom0 dumped the grant table. The initramfs
(~50 MB) is built once per test session in dom0 from the files the interpreter really uses.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from guests import GuestError, Kernel, build_initramfs, guest_extra, pv_guest, record_rerun

from xentools.tools.images.xl import GuestConfig, check_xl

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# The interpreter running these tests (the .venv's), by the path it was started with: the
# .venv's pyvenv.cfg is found beside that path, not beside the binary it links to.
PYTHON = Path(os.path.normpath(os.path.abspath(sys.executable)))
PROGRAM = HERE / "domu_guest.py"
SCENARIO = "python"
# The devices our platform needs in a domU (/dev/xen/xenbus is built into Debian's kernel).
DOMU_MODULES = ("xen-gntalloc", "xen-evtchn")
DOMU_MEMORY = 256  # MiB: the initramfs (~50 MB, unpacked into RAM) and Python
# What the domU program imports, at once or later: every module of the package (the CLI's
# commands import theirs lazily), the platform's libraries, ctypes for doctor. Run by the
# interpreter that collects the file list.
_COLLECT = """
import importlib.util, json, os, sys
sys.path.insert(0, sys.argv[1])
import contextlib, ctypes, ctypes.util, io, subprocess, traceback
import importlib, pkgutil
import domu_guest
import xentools
for info in pkgutil.walk_packages(xentools.__path__, "xentools."):
    if not info.name.endswith("__main__"):  # lazy imports too (doctor, the CLI's commands)
        importlib.import_module(info.name)
from xentools.platform.xen import platform
platform._lib(platform.GNTTAB_SONAME)
platform._lib(platform.EVTCHN_SONAME)
files = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and os.path.isfile(path):
        files.add(os.path.abspath(path))
        if path.endswith(".py"):
            cached = importlib.util.cache_from_source(path)
            if os.path.isfile(cached):
                files.add(cached)
with open("/proc/self/maps") as maps:
    for line in maps:
        words = line.split()
        if len(words) >= 6 and words[5].startswith("/") and os.path.isfile(words[5]):
            files.add(words[5])
files.add(os.path.join(sys.prefix, "pyvenv.cfg"))
for site in __import__("site").getsitepackages():
    for name in os.listdir(site):
        if name.endswith(".pth"):
            files.add(os.path.join(site, name))
print(json.dumps(sorted(files)))
"""


def _library_names(path: Path) -> list[str]:
    """`path` and the symlinks beside it that point to it (the soname a program asks for,
    e.g. libxengnttab.so.1 for libxengnttab.so.1.2): the initramfs gets a copy under each."""
    names = [path.name]
    try:
        for entry in os.scandir(path.parent):
            # libfoo.so (no version) is the link for building programs, never loaded.
            if entry.is_symlink() and entry.name.startswith(path.name.split(".so")[0]) \
                    and not entry.name.endswith(".so") and Path(entry.path).resolve() == path.resolve():
                names.append(entry.name)
    except OSError:
        pass
    return names


@functools.cache
def python_files() -> dict[str, Path]:
    """Inner path (relative to the initramfs root) -> source file: what sys.executable needs
    to run domu_guest.py, at dom0's paths. The interpreter is copied (not linked) to the
    path the domU starts it by, so that Python finds the .venv's pyvenv.cfg beside it; the
    ELF interpreter goes where the binary's PT_INTERP names it (/lib64 on x86-64)."""
    result = subprocess.run([str(PYTHON), "-c", _COLLECT, str(HERE)], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    if result.returncode != 0:
        raise GuestError(f"collecting the domU's Python files failed: {result.stderr.strip()[-2000:]}")
    out: dict[str, Path] = {}
    for name in json.loads(result.stdout):
        path = Path(name)
        if ".so" in path.name:
            for alias in _library_names(path):
                out[str(path.parent / alias).lstrip("/")] = path
        else:
            out[name.lstrip("/")] = path
    out[str(PYTHON).lstrip("/")] = PYTHON.resolve()
    loader = next((p for inner, p in out.items() if p.name.startswith("ld-linux")), None)
    if loader is None:
        raise GuestError("the domU's Python loads no ld-linux*: cannot tell its ELF interpreter")
    out[f"lib64/{loader.name}"] = loader
    return out


def unchecked_pyc(pyc: bytes, source: Path) -> bytes | None:
    """A timestamp-checked .pyc of `source`, turned into an unchecked hash-based one (PEP
    552: flags = 1), or None when it is not the bytecode of `source` as it is now. The
    initramfs stores every file with mtime 0, so a timestamp-checked .pyc would never match
    its source there and the domU would compile every module again, ~18x slower than here."""
    if len(pyc) < 16 or int.from_bytes(pyc[4:8], "little") != 0:
        return None
    st = source.stat()
    if pyc[8:16] != (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little"):
        return None
    return pyc[:4] + (1).to_bytes(4, "little") + pyc[8:]


def domu_initramfs(out: Path, kernel: Kernel, *, modules: tuple[str, ...] = DOMU_MODULES,
                   extra_files: dict[str, bytes] | None = None, executables: tuple[str, ...] = ()) -> Path:
    """The domU's initramfs: the python scenario, `modules`, the interpreter and everything it
    loads (python_files), plus `extra_files` (`executables` among them made executable)."""
    files = python_files()
    bodies = {}
    for inner, path in files.items():
        body = path.read_bytes()
        if "/__pycache__/" in inner and inner.endswith(".pyc"):
            source = path.parent.parent / (path.name.split(".", 1)[0] + ".py")
            body = unchecked_pyc(body, source) if source.is_file() else None
            if body is None:
                continue
        bodies[inner] = body
    elves = [inner for inner, body in bodies.items() if body[:4] == b"\x7fELF"]
    return build_initramfs(out, kernel=kernel, scenarios=(SCENARIO,), modules=modules,
                           extra_files={**bodies, **(extra_files or {})}, executables=(*elves, *executables))


def domu_config(name: str, kernel: Kernel, initramfs: Path, *, memory: int = DOMU_MEMORY,
                **params: object) -> GuestConfig:
    """A domU of `memory` MiB that runs domu_guest.py with this process's interpreter (the
    repository's .venv) from its initramfs. `params` go to the kernel command line as
    xentools.KEY=VALUE (task, vbds, seed, good, denied, load, hide, and the bench task's: see
    domu_guest.py and guest_init/python.sh)."""
    extra = guest_extra(SCENARIO, python=PYTHON, script=PROGRAM, cwd=REPO, **params)
    return pv_guest(name, kernel.image, initramfs, extra, memory=memory)


def acknowledge(xs, domid: int, devid: int) -> None:  # type: ignore[no-untyped-def]
    """Tell the domU program that dom0 has checked vbd `devid` (it waits for this)."""
    xs.write(f"/local/domain/{domid}/data/xentools-ack", str(devid))


# ------------------------------------------------------------------ Xen's tables, via dom0

_GRANT_HEADER = re.compile(r"grant-table for remote (?:d|domain:\s*)(\d+)")
_GRANT_ENTRY = re.compile(r"^\s*\[\s*(0x[0-9a-fA-F]+|\d+)\]\s+(\d+)\s")
_EVTCHN_HEADER = re.compile(r"Event channel information for (?:domain |d)(\d+)")
_EVTCHN_ENTRY = re.compile(r"^\s*(\d+)\s+\[[^\]]*\]:\s+s=(\d+)(.*)$")
_END = re.compile(r"\] done|Event channel information|grant-table for remote")


@dataclass(frozen=True)
class ActiveGrant:
    ref: int
    mapped_by: int  # the domain whose mapping pins it ("localdom" in Xen's dump)


@dataclass(frozen=True)
class BoundPort:
    port: int
    state: int  # ECS_*: 1 reserved, 2 unbound, 3 interdomain, 4 pirq, 5 virq, 6 ipi
    detail: str  # e.g. " d=0 p=12" for an interdomain channel


class XenTables:
    """Xen's debug-key dumps, read by dom0 through `xl debug-keys` and `xl dmesg`."""

    def __init__(self, keep_dir: Path | None = None) -> None:
        # Where each raw dump is copied (the harness's results share), for the reader of a failure.
        self.keep_dir = keep_dir
        self.dumps = 0

    def _dump(self, key: str) -> list[str]:
        # The console ring is small: a dump that wraps it loses its first lines (and with them
        # the header that says which domain the entries belong to). Clear it first.
        _xl("dmesg", "-c")
        _xl("debug-keys", key)
        marker = {"g": "gnttab_usage_print_all ] done", "e": None}[key]
        text = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = _xl("dmesg")
            if marker is None or marker in text:
                break
            time.sleep(0.2)
        self.dumps += 1
        if self.keep_dir is not None:
            self.keep_dir.mkdir(parents=True, exist_ok=True)
            (self.keep_dir / f"xen-dump-{self.dumps:02d}-{key}.log").write_text(text)
        return [line.split("(XEN) ", 1)[1] if "(XEN) " in line else line for line in text.splitlines()]

    def _entries(self, key: str, header: re.Pattern[str], entry: re.Pattern[str], domid: int) -> list[re.Match[str]]:
        """The entry lines of `domid`'s section of dump `key` (between its header and the
        next header or the dump's end). GuestError when the dump has no such section (a
        wrapped ring)."""
        section: list[re.Match[str]] | None = None
        for line in self._dump(key):
            found = header.search(line)
            if found:
                if section is not None:
                    break
                if int(found.group(1)) == domid:
                    section = []
                continue
            if section is not None:
                if _END.search(line):
                    break
                matched = entry.match(line)
                if matched:
                    section.append(matched)
        if section is None:
            raise GuestError(f"Xen's dump of debug key {key!r} has no section for d{domid}")
        return section

    def active_grants(self, domid: int) -> list[ActiveGrant]:
        """The grants of `domid` that some domain maps now (debug key 'g')."""
        return [ActiveGrant(int(m.group(1), 0), int(m.group(2)))
                for m in self._entries("g", _GRANT_HEADER, _GRANT_ENTRY, domid)]

    def bound_ports(self, domid: int) -> list[BoundPort]:
        """The event channel ports of `domid` that are not free (debug key 'e')."""
        return [BoundPort(int(m.group(1)), int(m.group(2)), m.group(3))
                for m in self._entries("e", _EVTCHN_HEADER, _EVTCHN_ENTRY, domid)]


def _xl(*args: str) -> str:
    return check_xl(args, timeout=60, on_rerun=record_rerun).stdout
