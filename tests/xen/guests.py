"""Test guests (PV domUs) and disks served by Linux's kernel blkback, for tests in dom0.

Owns:
- the guest initramfs: busybox + tests/xen/guest_init/ (/init and one script per scenario)
  + kernel modules with their dependency chains (`build_initramfs`), and the kernel command
  line that picks a scenario (`guest_extra`); the guest runs dom0's own Debian kernel;
- what the "disk-io" guest writes (`write_pattern`) and a small RAW disk image with an MBR
  partition table and an ext2 file system of known content (`make_disk_image`), for "banner";
- the test guest's xl.cfg (`pv_guest`: a PV guest of the tools layer's GuestConfig, kept
  after it ended) and its life in a test (`Guest`, a context manager, on the tools layer's
  xl lifecycle, xentools.tools.images.xl.XlDomain): `xl create -p`, vbds written before
  `xl unpause`, waiting on the console log that xenconsoled writes, and ALWAYS `xl destroy`
  at the end, with every repeat of a crashed `xl` recorded (`record_rerun`);
- a vbd served by the Linux kernel blkback from a loop device (`KernelVbd`): both xenstore
  directories written in one transaction by xentools.devices.toolstack.create_vbd, plus
  `physical-device` and `dev`, which libxl and its hotplug script would write (under nested
  emulation that script runs past libxl's timeout, so `xl create` gets no disk= line);
- the dom0 self-attach variant (`self_attach_kernel_vbd`): frontend domid 0, frontend
  directory outside device/vbd/, where no kernel frontend claims it.
Must not: decide a test's verdict (tests assert on what these return), or start Xen services
(tests/nested/dom0/boot.sh runs xenstored and `xenconsoled --log=guest`).

Runs in dom0 (the tests) and on the host (build_initramfs, make_disk_image, pv_guest need
no Xen). Facts behind the choices: /work/shared/docs/xen-in-qemu.md.
"""

from __future__ import annotations

import os
import re
import shlex
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xentools.core.errors import XentoolsError
from xentools.core.vbd import encode_vbd
from xentools.tools.images.initramfs import Cpio, newest_kernel
from xentools.tools.images.xl import (
    GuestConfig,
    LogConsole,
    XlDomain,
    console_log_path,
    domains,
    render_xl_cfg,
)

HERE = Path(__file__).resolve().parent
GUEST_INIT = HERE / "guest_init"
SCENARIOS = ("disk-io", "banner", "panic")
# What the scenarios load: xen-blkfront (disk-io, banner) and the ext2 driver (banner; Debian
# builds ext2 support into ext4.ko, CONFIG_EXT4_USE_FOR_EXT2).
DEFAULT_MODULES = ("xen-blkfront", "ext4")
# Where tests/nested/dom0/boot.sh tells xenconsoled (--log=guest) to write guest-<name>.log.
CONSOLE_LOG_DIR = Path("/var/log/xen/console")
# A dom0 self-attach for a USERSPACE frontend: not under device/vbd/, which the kernel's
# xen-blkfront claims entirely once loaded (xen-in-qemu.md). blkback reads the frontend path
# from its `frontend` key, so any path works.
SELF_FRONTEND_ROOT = "/local/domain/0/xentools-frontend/vbd"
BANNER = "xentools-guest login:"
# Linux's line for the panic scenario (drivers/tty/sysrq.c: sysrq_handle_crash panics with
# "sysrq triggered crash").
PANIC_LINE = "Kernel panic - not syncing: sysrq triggered crash"
XL_TIMEOUT = 120.0
POLL = 0.2
# Kernel command line words a guest reads (guest_init/init parses them without quoting).
_WORD = re.compile(r"[A-Za-z0-9_.+:/-]+")
_KEY = re.compile(r"[a-z_]+")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class GuestError(Exception):
    """A guest or a kernel vbd did not do what was asked (xl failed, a pattern never came,
    a backend never reached a state, cleanup left something). The message says what, with
    the console's tail where there is one."""


# ------------------------------------------------------------------- kernel and initramfs

@dataclass(frozen=True)
class Kernel:
    """A Linux kernel for PV guests. `image` is what xl.cfg's kernel= names: the harness's
    uncompressed ELF ($NESTED_GUEST_KERNEL) when there is one, since `xl create` of the
    xz-compressed bzImage spends ~5 s decompressing it in dom0 under nested TCG (~0.7 s for
    the ELF); else the bzImage `vmlinuz`."""

    version: str
    vmlinuz: Path
    image: Path


def guest_kernel(version: str | None = None) -> Kernel:
    """The kernel a guest boots: `version`, else the running one (in dom0: dom0's own),
    else (on the host) the one the nested harness boots. Its modules must be installed:
    the initramfs takes them from /lib/modules/<version>."""
    if version is None:
        version = os.uname().release
        if not Path(f"/boot/vmlinuz-{version}").is_file():
            # On the host: the kernel the nested harness boots (tests/nested/run.py).
            newest = newest_kernel()
            version = newest[0] if newest else version
    vmlinuz = Path(f"/boot/vmlinuz-{version}")
    if not vmlinuz.is_file() or not (Path("/lib/modules") / version / "modules.dep").is_file():
        raise GuestError(f"no {vmlinuz} with /lib/modules/{version}/modules.dep (Debian package linux-image-amd64)")
    image = vmlinuz
    prepared = os.environ.get("NESTED_GUEST_KERNEL")
    if prepared and Path(prepared).name == f"vmlinux-{version}" and Path(prepared).is_file():
        image = Path(prepared)
    return Kernel(version, vmlinuz, image)


def module_chain(kernel: Kernel, name: str) -> list[Path]:
    """NAME's module files in load order (its dependencies first), built-ins left out."""
    out = subprocess.run(
        ["modprobe", "-S", kernel.version, "--show-depends", name],
        capture_output=True, text=True, timeout=60,
    )
    if out.returncode != 0:
        raise GuestError(f"modprobe --show-depends {name} for {kernel.version}: {out.stderr.strip()}")
    return [Path(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("insmod ")]


def build_initramfs(
    out: Path,
    *,
    kernel: Kernel | None = None,
    scenarios: Iterable[str] = SCENARIOS,
    modules: Iterable[str] = DEFAULT_MODULES,
    extra_files: Mapping[str, bytes] | None = None,
    executables: Iterable[str] = (),
) -> Path:
    """Write a guest initramfs (uncompressed newc cpio) to `out` and return it.

    Contents: /bin/busybox (static), /init, /scenarios/<name>.sh for each scenario,
    /lib/modules/<file>.ko for each module's dependency chain with /lib/modules/deps
    ("name: file file ..." lines that /init's load_module reads), and `extra_files`
    (relative path inside the initramfs -> bytes; parent directories are made; those named
    in `executables` get mode 0755). A scenario
    of your own is an extra file "scenarios/NAME.sh", sourced by /init with its helpers
    (say, fail, load_module, wait_for_block) when the command line says
    xentools.scenario=NAME.
    """
    kernel = kernel or guest_kernel()
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise GuestError("no /bin/busybox (Debian package busybox-static)")
    cpio = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "mnt", "lib", "lib/modules", "scenarios"):
        cpio.directory(directory)
    # The kernel opens /dev/console for init before init can mount devtmpfs.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), executable=True)
    cpio.file("init", (GUEST_INIT / "init").read_bytes(), executable=True)
    for scenario in scenarios:
        script = GUEST_INIT / f"{scenario}.sh"
        if not script.is_file():
            raise GuestError(f"unknown guest scenario {scenario!r}: no {script}")
        cpio.file(f"scenarios/{scenario}.sh", script.read_bytes())
    written: set[str] = set()
    deps = []
    for name in modules:
        chain = module_chain(kernel, name)
        if not chain:
            raise GuestError(f"module {name} is built into {kernel.version} or unknown: nothing to load")
        for path in chain:
            if path.name not in written:
                cpio.file(f"lib/modules/{path.name}", path.read_bytes())
                written.add(path.name)
        deps.append(f"{name}: {' '.join(p.name for p in chain)}\n")
    cpio.file("lib/modules/deps", "".join(deps).encode())
    made = {"bin", "dev", "proc", "sys", "tmp", "mnt", "lib", "lib/modules", "scenarios"}
    executables = set(executables)
    for inner, body in (extra_files or {}).items():
        parts = Path(inner).parts
        if not parts or Path(inner).is_absolute() or ".." in parts:
            raise GuestError(f"initramfs file {inner!r}: give a relative path without '..'")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in made:
                cpio.directory(parent)
                made.add(parent)
        cpio.file("/".join(parts), body, executable=inner in executables)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_bytes(cpio.finish())
    os.replace(tmp, out)
    return out


def guest_extra(scenario: str, *, quiet: bool = True, **params: object) -> str:
    """The kernel command line (xl.cfg extra=) for `scenario` with its parameters.

    A parameter becomes xentools.<name>=<value> (underscores kept in the name); a tuple
    (offset, length) becomes "offset+length". disk-io: read=(off, len), write=(off, len),
    token=WORD, disk=xvda. banner: disk, part, file, then="wait"|"poweroff". All: then,
    timeout (seconds to wait for the disk). A scenario missing from the initramfs makes
    the guest print "GUEST: FAIL unknown scenario" and power off.
    """
    if not re.fullmatch(r"[a-z0-9-]+", scenario):
        raise GuestError(f"guest scenario {scenario!r}: a name like {', '.join(SCENARIOS)}")
    words = ["console=hvc0"]
    if quiet:
        words.append("quiet")
    words.append(f"xentools.scenario={scenario}")
    for key, value in params.items():
        if isinstance(value, tuple):
            value = "+".join(str(int(v)) for v in value)
        text = str(value)
        if not _KEY.fullmatch(key) or not _WORD.fullmatch(text):
            raise GuestError(f"guest parameter {key}={text!r}: names are [a-z_]+, values [A-Za-z0-9_.+:/-]+")
        words.append(f"xentools.{key}={text}")
    return " ".join(words)


def write_pattern(token: str, length: int) -> bytes:
    """The bytes the disk-io guest writes: `yes TOKEN | head -c LENGTH`."""
    line = (token + "\n").encode()
    return (line * (length // len(line) + 1))[:length]


def guest_lines(console: str) -> list[str]:
    """The scenario's result lines from a console log, without the "GUEST: " prefix."""
    return [line.split("GUEST: ", 1)[1].strip() for line in console.splitlines() if "GUEST: " in line]


# ------------------------------------------------------------------------------ disk image

SECTOR = 512


def mbr(partitions: Iterable[tuple[int, int, int]], disk_signature: int = 0x78656E74) -> bytes:
    """A classic MBR: up to 4 (start_lba, sectors, type) primary partitions, no boot code.
    CHS fields carry the "use LBA" value 0xFEFFFF, as partitioning tools do past 8 GiB."""
    entries = list(partitions)
    if len(entries) > 4:
        raise GuestError("an MBR holds at most 4 primary partitions")
    table = b"".join(
        struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", start, count)
        for start, count, ptype in entries
    )
    table += bytes(16 * (4 - len(entries)))
    return bytes(440) + struct.pack("<IH", disk_signature, 0) + table + b"\x55\xaa"


@dataclass(frozen=True)
class DiskImage:
    path: Path
    size: int
    partition_offset: int
    partition_size: int


def make_disk_image(
    path: Path,
    files: Mapping[str, bytes],
    *,
    size: int = 8 << 20,
    partition_offset: int = 1 << 20,
    label: str = "xentools",
) -> DiskImage:
    """A RAW disk image: an MBR with one Linux (0x83) partition at `partition_offset`
    holding an ext2 file system (1 KiB blocks) with `files` (name -> bytes) in its root.
    Made by mke2fs -d (e2fsprogs), which fills a file system from a directory without
    mounting it: no root, no loop device needed."""
    if partition_offset % SECTOR or size % 1024 or size <= partition_offset + (1 << 20):
        raise GuestError(f"disk image: size {size} and partition offset {partition_offset} do not fit")
    part_size = size - partition_offset
    with tempfile.TemporaryDirectory(prefix="xt-disk-") as src:
        for name, body in files.items():
            if "/" in name or name in ("", ".", ".."):
                raise GuestError(f"disk image: file name {name!r} must be a plain name")
            Path(src, name).write_bytes(body)
        with open(path, "wb") as disk:
            disk.truncate(size)
        try:
            result = subprocess.run(
                ["mke2fs", "-q", "-F", "-t", "ext2", "-b", "1024", "-L", label, "-d", src,
                 "-E", f"offset={partition_offset}", str(path), str(part_size // 1024)],
                capture_output=True, text=True, timeout=120,
            )
        except FileNotFoundError as err:
            raise GuestError("no mke2fs (Debian package e2fsprogs)") from err
        if result.returncode != 0:
            raise GuestError(f"mke2fs failed: {result.stderr.strip()}")
    with open(path, "r+b") as disk:
        disk.write(mbr([(partition_offset // SECTOR, part_size // SECTOR, 0x83)]))
    if path.stat().st_size != size:
        raise GuestError(f"disk image {path}: mke2fs left {path.stat().st_size} bytes, not {size}")
    return DiskImage(path, size, partition_offset, part_size)


# ------------------------------------------------------------------------------ processes

def _run(argv: list[str], *, timeout: float = XL_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise GuestError(f"{shlex.join(argv)}: no answer in {timeout:.0f} s") from err
    if check and result.returncode != 0:
        raise GuestError(f"{shlex.join(argv)} exited {result.returncode}: {(result.stderr or result.stdout).strip()}")
    return result


# Every re-run this process did because of the emulator (see tests/xen/conftest.py, which
# prints them in pytest's summary): a re-run hides bugs, so none goes unreported.
RERUNS: list[str] = []


def record_rerun(what: str) -> None:
    """Note one re-run (`what`: what failed and why it was run again); printed at once and in
    the test session's summary."""
    RERUNS.append(what)
    print(f"guests: RE-RUN {what}", flush=True)


def xl_domains() -> list[tuple[str, int]]:
    """(name, domid) of every domain `xl list` shows, Domain-0 included."""
    return domains(on_rerun=record_rerun)


def domain(name: str) -> XlDomain:
    """The xl lifecycle of domain `name` as the tests use it: every repeat recorded."""
    return XlDomain(name, on_rerun=record_rerun)


def wait_for_domains(before: Iterable[tuple[str, int]], timeout: float = 30.0) -> set[tuple[str, int]]:
    """Wait (bounded) until xl lists no domain that `before` did not; returns those left.
    `xl destroy` returns before Xen frees a domain whose pages a backend still maps."""
    before = set(before)
    deadline = time.monotonic() + timeout
    while (left := set(xl_domains()) - before) and time.monotonic() < deadline:
        time.sleep(POLL)
    return left


# ---------------------------------------------------------------------------------- guest

def pv_guest(name: str, kernel: Path, ramdisk: Path, extra: str, *, memory: int = 128, vcpus: int = 1) -> GuestConfig:
    """A PV guest booting `kernel` with `ramdisk`, no disk= (vbds are written by KernelVbd), no
    vif. on_* are "preserve": a guest that powered off or crashed stays until Guest.destroy,
    so xenconsoled can still read the end of its console ring and the test can read its final
    state. Memory in MiB: dom0 keeps 1024 of QEMU's 2048 (xl info free_memory ~1000); 64 is
    too little (Debian's 6.1 kernel image alone is 0x3a00 pages, and xl refuses the build)."""
    if not _NAME.fullmatch(name):
        raise GuestError(f"guest name {name!r}: use [A-Za-z0-9_.-]")
    cfg = GuestConfig(name, "pv", memory, vcpus, kernel=str(kernel), ramdisk=str(ramdisk), extra=extra,
                      on_poweroff="preserve", on_reboot="preserve", on_crash="preserve")
    try:
        render_xl_cfg(cfg)  # a value xl would misread is refused now, not at create
    except XentoolsError as err:
        raise GuestError(f"xl.cfg: {err}") from None
    return cfg


def _results_dir(name: str) -> Path | None:
    results = os.environ.get("NESTED_RESULTS")
    return Path(results) / name if results else None


def unique_name(prefix: str) -> str:
    """A domain name no other test uses (the console log file is named after it)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Guest:
    """One guest's life in a test (the tools layer's XlDomain, repeats recorded). Use as a
    context manager: created paused on enter, destroyed on exit whatever happened; kernel
    vbds attached through `attach_kernel_vbd` (and anything registered with `after_destroy`)
    are cleaned up after `xl destroy`.

        with Guest(pv_guest(name, kernel.image, initramfs, extra), workdir) as guest:
            guest.attach_kernel_vbd(xs, image)
            guest.unpause()
            guest.wait_for("GUEST: done disk-io", timeout=60)
    """

    cfg: GuestConfig
    workdir: Path
    console_dir: Path = CONSOLE_LOG_DIR
    # Where destroy() leaves a copy of the console log: the harness's results share
    # ($NESTED_RESULTS/guests/, kept on the host after dom0 powers off) when there is one.
    keep_console_dir: Path | None = field(default_factory=lambda: _results_dir("guests"))
    vbds: list[KernelVbd] = field(default_factory=list, init=False)
    # Seconds: "create" (xl create -p), "attach" (kernel vbds), "<pattern>" (first match,
    # counted from unpause), and destroy's steps, for reports on where the time goes.
    timings: dict[str, float] = field(default_factory=dict, init=False)
    domain: XlDomain = field(init=False, repr=False)
    _unpaused_at: float | None = field(default=None, init=False, repr=False)
    _create_tried: bool = field(default=False, init=False, repr=False)
    _cleanups: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False)
    _console_bytes: bytearray = field(default_factory=bytearray, init=False, repr=False)

    def __post_init__(self) -> None:
        self.domain = domain(self.cfg.name)

    @property
    def domid(self) -> int | None:
        return self.domain.domid

    @property
    def console_log(self) -> Path:
        return console_log_path(self.console_dir, self.cfg.name)

    def __enter__(self) -> Guest:
        try:
            self.create()
        except BaseException:
            self.destroy()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> int:
        """`xl create -p`: the domain exists, paused, with its console; returns its domid."""
        cfg_path = self.workdir / f"{self.cfg.name}.cfg"
        cfg_path.write_text(render_xl_cfg(self.cfg))
        began = time.monotonic()
        self._create_tried = True
        domid = self.domain.create(cfg_path)
        self.timings["create"] = time.monotonic() - began
        return domid

    def attach_kernel_vbd(self, xs, image: Path, *, devid: int = encode_vbd("xvda"), mode: str = "w",  # type: ignore[no-untyped-def]
                          frontend_dir: str | None = None) -> KernelVbd:
        """Serve `image` to this guest as vbd `devid` from Linux's blkback (call before
        unpause, so the guest's blkfront finds it at boot; `frontend_dir`: elsewhere than
        device/vbd/, for a userspace frontend in the guest). Detached after destroy."""
        if self.domid is None:
            raise GuestError("attach_kernel_vbd before create")
        began = time.monotonic()
        vbd = KernelVbd(xs, image, frontend_domid=self.domid, devid=devid, mode=mode, frontend_dir=frontend_dir)
        vbd.attach()
        self.vbds.append(vbd)
        self.after_destroy(vbd.detach)
        self.timings["attach"] = self.timings.get("attach", 0.0) + time.monotonic() - began
        return vbd

    def after_destroy(self, cleanup: Callable[[], None]) -> None:
        """Run `cleanup` in destroy(), after `xl destroy` and before waiting for the domain to
        disappear (latest registered first). For whatever serves the guest's devices: Xen
        frees a destroyed domain only once every grant dom0 mapped from it is unmapped, so a
        backend (kernel vbd, a userspace blkback process) must let go first. A cleanup that
        raises GuestError or OSError is reported by destroy, after the others ran."""
        self._cleanups.append(cleanup)

    def unpause(self) -> None:
        self.domain.unpause()
        self._unpaused_at = time.monotonic()

    def console(self) -> str:
        """The console log so far (xenconsoled's copy), carriage returns removed."""
        log = LogConsole(self.console_log, len(self._console_bytes))  # what came since the last look
        try:
            while data := log.read(0.0):
                self._console_bytes += data
        finally:
            log.close()
        return self._console_bytes.decode("utf-8", "replace").replace("\r", "")

    def ended(self) -> str | None:
        """"shutdown", "crashed" or "gone" once the guest stopped running, else None."""
        return self.domain.ended()

    def _tail(self, lines: int = 25) -> str:
        text = self.console().splitlines()[-lines:]
        return "\n".join(f"  | {line}" for line in text) or "  | (no console output)"

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 90.0) -> re.Match[str]:
        """The first match of `pattern` (a plain string is matched literally) in the console.
        Raises GuestError with the console's tail when the guest ends without it or the
        timeout passes."""
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        next_state = 0.0
        end: str | None = None
        while True:
            found = regex.search(self.console())
            if found:
                if self._unpaused_at is not None:
                    what = pattern if isinstance(pattern, str) else regex.pattern
                    self.timings.setdefault(what, time.monotonic() - self._unpaused_at)
                return found
            now = time.monotonic()
            if end is not None:
                raise GuestError(f"guest {self.cfg.name} ended ({end}) without {regex.pattern!r}; console:\n{self._tail()}")
            if now > deadline:
                raise GuestError(f"guest {self.cfg.name}: no {regex.pattern!r} in {timeout:.0f} s; console:\n{self._tail()}")
            if now >= next_state:
                end = self.ended()
                next_state = now + 1.0
                if end is not None:
                    # One more look: xenconsoled may still be copying the ring's last bytes.
                    time.sleep(1.0)
                    continue
            time.sleep(POLL)

    def wait_end(self, timeout: float = 90.0) -> str:
        """Wait until the guest stopped running: "shutdown", "crashed" or "gone"."""
        end = self.domain.wait_ended(timeout)
        if end is None:
            raise GuestError(f"guest {self.cfg.name} still running after {timeout:.0f} s; console:\n{self._tail()}")
        if self._unpaused_at is not None:
            self.timings.setdefault("ended", time.monotonic() - self._unpaused_at)
        return end

    def destroy(self) -> None:
        """`xl destroy` (idempotent), the after_destroy cleanups (kernel vbds detached), wait
        until xl no longer lists the domain. Raises GuestError if anything stays behind.

        Order: Xen keeps a destroyed domain (dying, "d") until every page of it that dom0
        mapped is unmapped, and blkback unmaps the guest's ring and persistent grants only
        when its device goes away; so backends go before waiting for the domain."""
        problems = []
        began = time.monotonic()
        # The guest's own re-runs (/init's `run`: a process killed by a signal, run again).
        for note in re.findall(r"GUEST: note (.+ killed by signal \d+), running it again", self.console()):
            record_rerun(f"in guest {self.cfg.name}: {note}")
        if self._create_tried:
            try:
                why = self.domain.destroy()
            except XentoolsError as err:
                why = str(err)
            if why is not None:
                problems.append(f"xl destroy {self.cfg.name}: {why}")
        self.timings["xl destroy"] = time.monotonic() - began
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                cleanup()
            except (GuestError, OSError) as err:
                problems.append(str(err))
        self.timings["backends gone"] = time.monotonic() - began
        if self.domid is not None and not self.domain.wait_gone(30):
            problems.append(f"domain {self.domid} still listed 30 s after xl destroy")
        self.timings["domain gone"] = time.monotonic() - began
        if self.keep_console_dir is not None and self.console_log.exists():
            try:
                self.keep_console_dir.mkdir(parents=True, exist_ok=True)
                (self.keep_console_dir / f"{self.cfg.name}.log").write_bytes(self.console_log.read_bytes())
                (self.keep_console_dir / f"{self.cfg.name}.timings").write_text(
                    "".join(f"{k}: {v:.2f} s\n" for k, v in self.timings.items()))
            except OSError as err:
                problems.append(f"keeping the console log in {self.keep_console_dir}: {err}")
        if problems:
            raise GuestError(f"guest {self.cfg.name} cleanup: " + "; ".join(problems))


# ------------------------------------------------------------------------ kernel blkback

class KernelVbd:
    """`image` served by Linux's xen-blkback: a loop device over the file, and the vbd's
    backend (dom0) and frontend directories written in ONE transaction, state 1 in both.

    Backend keys (create_vbd): frontend, frontend-id, params (the loop device), type "phy",
    mode, online=1, state=1, plus two keys libxl and its hotplug script normally write:
    physical-device "<major hex>:<minor hex>", which blkback needs before it opens the
    device, and dev (the vdev name, e.g. "xvda"), without which blkback connects but
    starts no thread to serve the ring.
    Frontend keys: backend, backend-id, virtual-device (= devid), device-type disk, state=1.
    Permissions: backend owned by dom0 and readable by the frontend domain, frontend owned by
    the frontend domain and readable by dom0.
    """

    def __init__(
        self,
        xs,  # xentools.platform.xenstore.XenstoreClient in dom0  # type: ignore[no-untyped-def]
        image: Path,
        *,
        frontend_domid: int,
        devid: int = encode_vbd("xvda"),
        mode: str = "w",
        frontend_dir: str | None = None,
    ) -> None:
        if mode not in ("r", "w"):
            raise GuestError(f"vbd mode {mode!r}: 'r' or 'w'")
        self.xs = xs
        self.image = Path(image)
        self.frontend_domid = frontend_domid
        self.devid = devid
        self.mode = mode
        self.frontend_dir = frontend_dir
        self.loop: str | None = None
        self.paths = None  # VbdPaths once attached

    def __enter__(self) -> KernelVbd:
        if self.paths is None:
            self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def sysfs(self) -> Path:
        """blkback's device on the xen-backend bus (exists while blkback holds the vbd)."""
        return Path(f"/sys/bus/xen-backend/devices/vbd-{self.frontend_domid}-{self.devid}")

    def attach(self):  # type: ignore[no-untyped-def]
        """losetup, then both directories in one transaction; returns the VbdPaths."""
        from xentools.core.vbd import decode_vbd
        from xentools.devices.toolstack import create_vbd

        argv = ["losetup", "--find", "--show"] + (["--read-only"] if self.mode == "r" else []) + [str(self.image)]
        self.loop = _run(argv).stdout.strip()
        rdev = os.stat(self.loop).st_rdev
        try:
            self.paths = create_vbd(
                self.xs,
                backend_domid=0,
                frontend_domid=self.frontend_domid,
                devid=self.devid,
                params=self.loop,
                mode=self.mode,
                type="phy",
                extra_backend={
                    "physical-device": f"{os.major(rdev):x}:{os.minor(rdev):x}",
                    # blkback names its ring threads after `dev` (blkback.<domid>.<dev>-<n>)
                    # and starts none without it: the vbd connects, then no request is
                    # ever served ("get blkback dev name", ENOENT). libxl writes the vdev.
                    "dev": decode_vbd(self.devid),
                },
                frontend_dir=self.frontend_dir,
            )
        except BaseException:
            _run(["losetup", "-d", self.loop], check=False)
            self.loop = None
            raise
        return self.paths

    def backend(self, key: str) -> str | None:
        """A key of the backend directory, None when absent."""
        from xentools.platform.interface import XenstoreError

        try:
            return self.xs.read(f"{self.paths.backend}/{key}").decode()
        except XenstoreError as err:
            if err.errno_name == "ENOENT":
                return None
            raise

    def wait_backend_state(self, states: Iterable[int], timeout: float = 60.0) -> int:
        """Poll the backend's `state` until it is one of `states` (XenbusState numbers)."""
        wanted = {int(s) for s in states}
        deadline = time.monotonic() + timeout
        while True:
            value = self.backend("state")
            if value is not None and value.isdigit() and int(value) in wanted:
                return int(value)
            if time.monotonic() > deadline:
                raise GuestError(f"{self.paths.backend}/state is {value!r}, not one of {sorted(wanted)} after {timeout:.0f} s")
            time.sleep(POLL)

    def detach(self, timeout: float = 30.0) -> None:
        """Remove both directories (blkback then lets go of the device), wait until
        blkback's device is gone, detach the loop device. Idempotent."""
        from xentools.devices.toolstack import destroy_vbd

        problems = []
        if self.paths is not None:
            destroy_vbd(self.xs, self.paths)
            self.paths = None
            deadline = time.monotonic() + timeout
            while self.sysfs.exists() and time.monotonic() < deadline:
                time.sleep(POLL)
            if self.sysfs.exists():
                problems.append(f"blkback still holds {self.sysfs.name} {timeout:.0f} s after its directories went")
        if self.loop is not None:
            result = _run(["losetup", "-d", self.loop], check=False)
            if result.returncode != 0:
                problems.append(f"losetup -d {self.loop}: {result.stderr.strip()}")
            self.loop = None
        if problems:
            raise GuestError("; ".join(problems))


def self_attach_kernel_vbd(xs, image: Path, *, devid: int = encode_vbd("xvda"), mode: str = "w") -> KernelVbd:  # type: ignore[no-untyped-def]
    """A vbd for a frontend in dom0 itself (frontend domid 0) served by the kernel blkback,
    with the frontend directory at SELF_FRONTEND_ROOT/<devid>, where no kernel driver
    claims it. Attached on return (use as a context manager or call detach)."""
    vbd = KernelVbd(xs, image, frontend_domid=0, devid=devid, mode=mode, frontend_dir=f"{SELF_FRONTEND_ROOT}/{devid}")
    vbd.attach()
    return vbd
