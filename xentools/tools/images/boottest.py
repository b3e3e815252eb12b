"""Boot a guest image under xl and decide whether it booted.

Owns: what goes into a test guest's xl.cfg (HVM for release images, with its firmware,
emulated disk controller and extra --xl-cfg lines; PV/PVH with kernel=, ramdisk=, extra=;
rendered by xentools.tools.images.xl), the checks before a run (image is RAW unless forced,
xl found, root, an HVM guest's device model and firmware installed), the guest's size from
`xl info`, the disk servers (the host's usual backend or qdisk through the cfg's `disk=` line,
or OUR blkback: xenstore nodes written by xentools.devices.toolstack plus a `python -m
xentools blkback serve` process, with the options of a configuration row or --fault specs
when asked; an HVM guest's firmware then gets the image through QEMU's emulated disk,
device_model_args_hvm), which console is read (xenconsoled's `guest-<name>.log`, `xl console`
on a pty, or for HVM the emulated UART, `xl console -t serial`), Xen's log of the domain
(`xl dmesg`: firmware lines, a triple fault), the boot milestones, and the run itself: the
guest's life through xl.XlDomain (`xl create -p`, attach the console, `xl unpause`, feed the
verdict engine, and ALWAYS `xl destroy` at the end). Writes the cfg, the console log, the
JSON report, the JUnit XML (with --fault, their fault section: the reaction read by
matrix.classify_reaction; such a boot ends FAULT_SETTLE s after the frontend marked its disk
broken, nothing more can happen to that disk).
Must not: decide a verdict from console text itself (verdict.py does; here only Xen's own
log turns a verdict into `error`), or run a process other than through its Runner (so tests
drive it with a fake `xl`).

Order matters: the guest is created paused and the console attached before `xl unpause`,
so that no early output is lost (measured, xen-in-qemu.md); a vbd served by our blkback is
written (both directories in one transaction) and our blkback has reached InitWait before
the guest runs, so its blkfront finds the device at boot. At the end the guest goes first,
then the vbd's directories, which makes our blkback unmap the guest's pages (Xen frees a
destroyed domain only then), write its report and exit.
An `xl` killed by a signal is asked again (except `create`; xl.run_xl): under nested
emulation dom0 processes (xenstore-ls, Python) were seen to die of SIGSEGV now and then, and
a crash is no answer about the guest.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from xentools.core.errors import XentoolsError
from xentools.tools.images.diskformat import ImageInfo, inspect_image, require_raw
from xentools.tools.images.errors import BootTestError, ImageFormatError
from xentools.tools.images.matrix import classify_reaction, disk_given_up, fault_section
from xentools.tools.images.report import BootResult, write_reports
from xentools.tools.images.verdict import Decision, Rules, Verdict, VerdictEngine
from xentools.tools.images.xl import (
    XL_TIMEOUT,
    Console,
    GuestConfig,
    LogConsole,
    Runner,
    SubprocessRunner,
    XlDomain,
    console_log_path,
    parse_cfg_line,
    render_xl_cfg,
)

__all__ = [
    "BootTest", "DiskServer", "HostDisk", "XentoolsDisk", "default_blkback_argv", "domain_name", "preflight",
]

# How the report's notes begin for an xl command asked again after it crashed.
XL_REPEAT_NOTE = "xl repeated: "
# Seconds a --fault boot goes on after the guest's frontend marked its disk broken (a crash
# that follows is still seen); then it ends without waiting for the idle timeout.
FAULT_SETTLE = 5.0
READ_SLICE = 0.2
_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class HostResources:
    """What `xl info` says the host can give a guest."""

    free_memory_mb: int
    nr_cpus: int


# MiB a guest needs at least, and what the toolstack takes on top of an HVM guest's memory
# (video RAM, shadow/HAP tables, the firmware's tables; xl.cfg(5) "videoram", "shadow_memory").
MIN_MEMORY_MB = {"hvm": 128, "pvh": 64, "pv": 64}
HVM_OVERHEAD_MB = 24


def parse_xl_info(text: str) -> HostResources:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        return HostResources(int(fields["free_memory"]), int(fields["nr_cpus"]))
    except (KeyError, ValueError):
        raise BootTestError("boottest.xl_info", "xl info printed no free_memory/nr_cpus: is this a Xen dom0?") from None


def host_resources(xl: str, runner: Runner | None = None) -> HostResources:
    """`xl info`'s free memory and CPU count."""
    done = (runner or SubprocessRunner()).run([xl, "info"], XL_TIMEOUT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BootTestError("boottest.xl_info", f"xl info failed (exit {done.returncode}): {last}")
    return parse_xl_info(done.stdout)


def fit_guest(guest_type: str, host: HostResources, *, memory: int | None, vcpus: int | None,
              default_memory: int, default_vcpus: int) -> tuple[int, int]:
    """(memory MiB, vCPUs) for the guest: what was asked, else the profile's value cut down to
    what the host has free. Raises BootTestError naming the fix when it cannot fit."""
    overhead = HVM_OVERHEAD_MB if guest_type == "hvm" else 0
    room = host.free_memory_mb - overhead
    least = MIN_MEMORY_MB.get(guest_type, 64)
    if memory is not None:
        if memory > room:
            raise BootTestError("boottest.memory", f"--memory {memory} does not fit: the host has "
                                                   f"{host.free_memory_mb} MiB free (xl info free_memory), "
                                                   f"{overhead} of which the toolstack needs for this guest; "
                                                   f"give --memory {max(room, 0)} or less, or free memory in dom0")
        chosen_memory = memory
    else:
        chosen_memory = min(default_memory, room)
        if chosen_memory < least:
            raise BootTestError("boottest.memory", f"not enough free memory for a {guest_type} guest: the host has "
                                                   f"{host.free_memory_mb} MiB free (xl info free_memory), it needs "
                                                   f"{least + overhead}; stop other guests or shrink dom0 "
                                                   f"(xl mem-set 0 ...)")
    chosen_vcpus = vcpus if vcpus is not None else max(1, min(default_vcpus, host.nr_cpus))
    return chosen_memory, chosen_vcpus


def domain_name(image: str | os.PathLike[str], pid: int | None = None) -> str:
    """A domain name unique to this run: xtbt-<image stem>-<pid>."""
    stem = Path(image).name
    for suffix in (".xz", ".raw", ".img"):
        stem = stem.removesuffix(suffix)
    stem = _NAME_OK.sub("-", stem).strip("-")[:40] or "image"
    return f"xtbt-{stem}-{os.getpid() if pid is None else pid}"


# Debian's paths (xen-utils-4.17's libxl): the HVM device model and the firmware files.
DEVICE_MODEL = ("/usr/libexec/xen-qemu-system-i386", "qemu-system-xen", "device_model_override")
FIRMWARE_FILES = {
    "seabios": ("/usr/share/seabios/bios-256k.bin", "seabios", "bios_path_override"),
    "ovmf": ("/usr/share/ovmf/OVMF.fd", "ovmf", "bios_path_override"),
}


def _refuse_unless_raw(info: ImageInfo, force_format: str | None) -> None:
    """require_raw, except that the conversion hint never names the image as its own output
    (a VHD called disk.raw would be told to convert disk.raw into disk.raw)."""
    if force_format == "raw" or info.is_raw:
        return
    try:
        require_raw(info)
    except ImageFormatError as err:
        base = os.path.splitext(info.path)[0]
        if info.qemu_format and base + ".raw" == info.path:
            out = shlex.quote(base + "-converted.raw")
            fix = (f"qemu-img convert -f {info.qemu_format} -O raw {shlex.quote(info.path)} {out}")
            raise ImageFormatError("image.not_raw", f"{info.path} is {info.detail}, not a RAW disk image; "
                                                    f"convert it first: {fix}") from None
        raise err from None


def preflight(image: str | os.PathLike[str], *, xl: str = "xl", kernel: str | None = None,
              ramdisk: str | None = None, euid: int | None = None, guest_type: str | None = None,
              firmware: str | None = None, extra_cfg: Sequence[str] = (),
              force_format: str | None = None) -> tuple[ImageInfo, str]:
    """Check before anything runs: the image is RAW (unless forced), kernel/ramdisk exist, an
    HVM guest's device model and firmware are installed (or overridden with --xl-cfg), xl is
    found, we are root. Returns the image's info and xl's path; raises ImageFormatError or
    BootTestError."""
    info = inspect_image(image)
    _refuse_unless_raw(info, force_format)
    for what, path in (("kernel", kernel), ("ramdisk", ramdisk)):
        if path is not None and not os.path.isfile(path):
            raise BootTestError(f"boottest.{what}_missing", f"{what} {path} does not exist")
    keys = {parse_cfg_line(line).split(" =", 1)[0] for line in extra_cfg}
    if guest_type == "hvm":
        needed = [("device model", *DEVICE_MODEL)]
        if firmware is not None:
            needed.append((f"{firmware} firmware", *FIRMWARE_FILES[firmware]))
        for what, path, package, override in needed:
            if override not in keys and not os.path.exists(path):
                raise BootTestError("boottest.hvm_missing", f"no HVM {what} {path}: apt-get install {package}, "
                                                            f"or give --xl-cfg \"{override}='PATH'\"")
    xl_path = shutil.which(xl)
    if xl_path is None:
        raise BootTestError("boottest.no_xl", f"{xl!r} not found on PATH: boot tests run in a Xen host's dom0 "
                                              "(Debian: apt-get install xen-utils-4.17), or give --xl")
    if (os.geteuid() if euid is None else euid) != 0:
        raise BootTestError("boottest.not_root", "boot-test must run as root: xl needs dom0's privileged Xen "
                                                 "interfaces (try sudo)")
    return info, xl_path


# --------------------------------------------------------------------------------- disks

class DiskServer(abc.ABC):
    """Who serves the guest's disk. `start` runs after `xl create -p` and before unpause;
    `stop` after the guest is destroyed and returns what the backend reported."""

    kind: str

    @abc.abstractmethod
    def xl_disks(self) -> list[str]:
        """Entries of the cfg's disk= list."""

    def start(self, domid: int) -> None:
        """Nothing to do for a backend the toolstack starts."""

    def stop(self) -> Mapping[str, object] | None:
        return None

    def failure(self) -> str | None:
        """Why the backend can no longer serve the disk (checked while the guest runs), or None."""
        return None

    def device_model_args(self, emulated_disk: str) -> list[str]:
        """QEMU arguments an HVM guest's firmware needs to see the disk (none when the
        toolstack's disk= line gives QEMU the disk itself)."""
        return []

    def connected(self) -> bool:
        """True once the guest's frontend has connected to this backend (when known)."""
        return False


def read_state(xs: Any, path: str) -> int | None:
    """A xenbus state node as a number; None when it is absent or not a number."""
    from xentools.platform.interface import XenstoreError

    try:
        raw = xs.read(path)
    except XenstoreError:
        return None
    text = raw.decode("ascii", "replace").strip() if isinstance(raw, bytes) else str(raw)
    return int(text) if text.isdigit() else None


class HostDisk(DiskServer):
    """The host's usual backend: xl and its hotplug scripts attach the image (or, with
    backendtype "qdisk", QEMU in dom0 serves it, with no hotplug script). Whether the guest's
    frontend connected is read from its xenstore state, for the boot milestones only: without
    a reachable xenstore (a test's fake xl) it stays unknown."""

    kind = "host"

    def __init__(self, image: str, vdev: str = "xvda", writable: bool = True, backendtype: str | None = None,
                 connect: Callable[[], Any] | None = None) -> None:
        self.image = os.path.abspath(image)
        self.vdev = vdev
        self.access = "rw" if writable else "ro"
        self.backendtype = backendtype
        if backendtype:
            self.kind = backendtype
        self._connect = connect
        self._xs: Any = None
        self._state_path: str | None = None
        self._connected = False

    def start(self, domid: int) -> None:
        from xentools.core.vbd import encode_vbd

        self._state_path = f"/local/domain/{domid}/device/vbd/{encode_vbd(self.vdev)}/state"

    def connected(self) -> bool:
        if self._connected or self._state_path is None:
            return self._connected
        if self._xs is None:
            if self._connect is None:
                from xentools.platform.xenstore import XenstoreClient
                self._connect = XenstoreClient.connect
            try:
                self._xs = self._connect()
            except XentoolsError:
                self._state_path = None  # no xenstore here: unknown, and not asked again
                return False
        self._connected = read_state(self._xs, self._state_path) == 4
        return self._connected

    def stop(self) -> Mapping[str, object] | None:
        if self._xs is not None:
            with contextlib.suppress(Exception):
                self._xs.close()
            self._xs = None
        return None

    def xl_disks(self) -> list[str]:
        # target= must come last: everything after it, commas included, is the path.
        backend = f"backendtype={self.backendtype}," if self.backendtype else ""
        return [f"format=raw,vdev={self.vdev},access={self.access},{backend}target={self.image}"]


def emulated_disk_args(image: str, emulated_disk: str, *, read_only: bool) -> list[str]:
    """QEMU arguments (xl.cfg device_model_args_hvm) that give an HVM guest's firmware the
    image as its first disk on the emulated controller, without a disk= line: the PV path
    is then ours alone. IDE: the xenfv machine's PIIX controller, primary master, which
    QEMU's Xen unplug protocol removes once the guest's PV drivers ask. AHCI: a controller
    of its own (hdtype='ahci' does the same for disk= lines)."""
    if "," in image:
        raise BootTestError("boottest.image_path", f"image path {image!r} contains ',', which QEMU's -drive cannot carry")
    # QEMU's IDE/AHCI disks refuse a read-only drive ("Can't use a read-only drive"):
    # snapshot=on gives the firmware a writable view whose writes go to a temporary overlay.
    ro = ",snapshot=on" if read_only else ""
    drive = f"file={image},if=none,id=xtdisk0,format=raw{ro}"
    if emulated_disk == "ahci":
        return ["-device", "ahci,id=xtahci0", "-drive", drive, "-device", "ide-hd,bus=xtahci0.0,unit=0,drive=xtdisk0"]
    return ["-drive", drive, "-device", "ide-hd,bus=ide.0,unit=0,drive=xtdisk0"]


def default_blkback_argv(backend_path: str, image: str, report: str, *, read_only: bool = False,
                         options: Sequence[str] = ()) -> list[str]:
    """How our blkback process is started for one vbd: `xentools blkback serve` (its options
    are owned by xentools.tools.blkback_cmd; this is the one place that spells them here),
    plus `options` (a configuration row's knobs, --fault specs)."""
    argv = [sys.executable, "-m", "xentools", "blkback", "serve", "--backend-path", backend_path,
            "--image", image, "--report", report]
    return argv + (["--read-only"] if read_only else []) + list(options)


class XentoolsDisk(DiskServer):
    """OUR blkback: the vbd's xenstore directories written by xentools.devices.toolstack
    (one transaction, the backend one under backend/xtvbd/), then a blkback process serving
    them. `start` returns once the backend reached InitWait (its features written, its
    signal handlers installed), so the guest is unpaused only when its disk can connect and
    a backend that cannot start is the test's error, not the guest's timeout. At stop, the
    vbd's directories are removed, which makes blkback disconnect, write its conformance
    report (JSON file) and exit; only a backend that does not is sent SIGTERM, then killed.
    blkback's own output goes to `<report>.log`: our stdout carries the verdict only."""

    kind = "xentools"

    def __init__(self, image: str, *, report_path: str, vdev: str = "xvda", writable: bool = True,
                 backend_domid: int = 0, connect: Callable[[], Any] | None = None,
                 create_vbd: Callable[..., Any] | None = None, destroy_vbd: Callable[..., Any] | None = None,
                 blkback_argv: Callable[..., list[str]] = default_blkback_argv,
                 stop_timeout: float = 10.0, exit_grace: float = 30.0, ready_timeout: float = 120.0,
                 backend_kind: str | None = None, poll: float = 0.1, blkback_options: Sequence[str] = ()) -> None:
        self.image = os.path.abspath(image)
        self.blkback_options = tuple(blkback_options)
        self.report_path = report_path
        self.log_path = report_path + ".log"
        self.vdev = vdev
        self.writable = writable
        self.backend_domid = backend_domid
        self.backend_kind = backend_kind  # None: toolstack.USERSPACE_BACKEND_KIND
        self._connect = connect
        self._create_vbd = create_vbd
        self._destroy_vbd = destroy_vbd
        self._blkback_argv = blkback_argv
        self._stop_timeout = stop_timeout
        # Seconds. A Python process in a nested dom0 starts ~18x slower than on bare metal.
        self._exit_grace = exit_grace
        self._ready_timeout = ready_timeout
        self._poll = poll
        self._xs: Any = None
        self._paths: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self.ready_after: float | None = None  # seconds from spawn to InitWait
        self._connected = False

    def xl_disks(self) -> list[str]:
        return []  # the toolstack part is ours: xl must not attach the disk as well

    def start(self, domid: int) -> None:
        # Imported here: the devices layer is needed only when our backend is chosen.
        from xentools.core.vbd import encode_vbd

        if self._create_vbd is None or self._destroy_vbd is None:
            from xentools.devices import toolstack
            self._create_vbd = self._create_vbd or toolstack.create_vbd
            self._destroy_vbd = self._destroy_vbd or toolstack.destroy_vbd
        if self.backend_kind is None:
            from xentools.devices.toolstack import USERSPACE_BACKEND_KIND
            self.backend_kind = USERSPACE_BACKEND_KIND
        if self._connect is None:
            from xentools.platform.xenstore import XenstoreClient
            self._connect = XenstoreClient.connect
        self._xs = self._connect()
        # Under backend/xtvbd/, not backend/vbd/: dom0's kernel xen-blkback (loaded on any
        # Xen host) claims every node of backend/vbd/ and would bind the frontend's event
        # channel before our process could (xen-in-qemu.md).
        self._paths = self._create_vbd(
            self._xs, backend_domid=self.backend_domid, frontend_domid=domid, devid=encode_vbd(self.vdev),
            params=self.image, mode="w" if self.writable else "r", backend_kind=self.backend_kind,
        )
        argv = self._blkback_argv(self._paths.backend, self.image, self.report_path, read_only=not self.writable,
                                  options=self.blkback_options)
        # A crash in native code (libxengnttab through cffi) then leaves a traceback in the log.
        env = dict(os.environ, PYTHONFAULTHANDLER="1")
        began = time.monotonic()
        try:
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                              start_new_session=True, env=env)
        except OSError as err:
            raise BootTestError("boottest.blkback", f"cannot start blkback ({argv[0]}): {err.strerror}") from None
        self._wait_ready(began)

    def _backend_state(self) -> int | None:
        return read_state(self._xs, f"{self._paths.backend}/state")

    def _wait_ready(self, began: float) -> None:
        # blkif: the backend writes its features, then InitWait (2); a frontend connects after.
        deadline = began + self._ready_timeout
        while True:
            why = self._exited()
            if why is not None:
                raise BootTestError("boottest.blkback", f"{why} before it served the disk; log {self.log_path}")
            state = self._backend_state()
            if state is not None and state >= 2:
                self.ready_after = time.monotonic() - began
                return
            if time.monotonic() > deadline:
                raise BootTestError("boottest.blkback", f"blkback did not reach InitWait at {self._paths.backend} "
                                                        f"within {self._ready_timeout:g} s (state {state}); "
                                                        f"see {self.log_path}")
            time.sleep(self._poll)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def _exited(self) -> str | None:
        if self._proc is None or self._proc.poll() is None:
            return None
        last = self._log_tail()
        return f"blkback exited {self._proc.returncode}" + (f" ({last})" if last else "")

    def device_model_args(self, emulated_disk: str) -> list[str]:
        return emulated_disk_args(self.image, emulated_disk, read_only=not self.writable)

    def connected(self) -> bool:
        # blkif: the backend writes Connected (4) once the frontend's ring is mapped.
        if not self._connected and not self._stopping and self._paths is not None:
            self._connected = self._backend_state() == 4
        return self._connected

    def failure(self) -> str | None:
        # A clean exit while the guest runs means its frontend went away (the guest ended),
        # which the guest's own state shows; a crash or an error is the backend's failure.
        if self._stopping or self._proc is None or self._proc.poll() in (None, 0):
            return None
        return f"{self._exited()} while the guest ran; log {self.log_path}"

    def stop(self) -> Mapping[str, object] | None:
        self._stopping = True
        errors = []
        exit_code = None
        if self._xs is not None and self._paths is not None:
            # Removing its directory is how the toolstack tells blkback to go: it unmaps the
            # guest's grants, writes its report and exits by itself.
            try:
                self._destroy_vbd(self._xs, self._paths)  # type: ignore[misc]
            except XentoolsError as err:
                errors.append(f"removing the vbd's xenstore directories failed: {err}")
        if self._proc is not None:
            try:
                self._proc.wait(self._exit_grace)
            except subprocess.TimeoutExpired:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(self._stop_timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                    errors.append(f"blkback did not stop within {self._stop_timeout:g} s of SIGTERM; killed")
            exit_code = self._proc.returncode
            if exit_code != 0:
                last = self._log_tail()
                errors.append(f"blkback exited {exit_code}" + (f": {last}" if last else ""))
        if self._xs is not None:
            with contextlib.suppress(Exception):
                self._xs.close()
        if self._proc is None:
            return None
        report: dict[str, object] = {"blkback_exit_code": exit_code, "report_file": self.report_path,
                                     "log_file": self.log_path}
        if self.ready_after is not None:
            report["ready_after_s"] = round(self.ready_after, 3)
        try:
            report["conformance"] = json.loads(Path(self.report_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            report["conformance"] = None
            errors.append(f"no blkback report at {self.report_path}: {getattr(err, 'strerror', None) or err}")
        report["errors"] = errors
        return report


def _read_text(path: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------ Xen log

XEN_LOG_KEEP = 400
# Xen's words when it kills a domain (hvm_triple_fault, the x86 emulator giving up, SVM's
# instruction-length decoder under nested emulation, domain_crash).
XEN_FATAL = (re.compile(r"Triple fault"), re.compile(r"MMIO emulation failed"),
             re.compile(r"Insn len emulation failed"), re.compile(r"domain_crash"),
             re.compile(r"crashed on cpu#"))
# SeaBIOS (and OVMF) when nothing on the disk boots; SeaBIOS then retries forever.
FIRMWARE_NO_BOOT = (re.compile(r"Boot failed: .*"), re.compile(r"No bootable device"))
# The first kernel line a boot shows (Linux's decompressor or banner; FreeBSD's banner).
KERNEL_LINE = re.compile(r"Decompressing Linux|Booting the kernel|Linux version \d|"
                         r"Copyright \(c\) 1992-\d+ The FreeBSD Project")
# Linux's xen-blkfront and FreeBSD's xbd when their disk connected.
BLKFRONT_LINE = re.compile(r"blkfront: xvd[a-z]+: |xbd\d+: .*<Virtual Block Device>")


_XEN_NOISE = re.compile(r"^\(XEN\) HVM\s?d?\d+(v\d+)? (save|restore):")


def domain_xen_lines(dmesg: str, domid: int) -> list[str]:
    """The lines of `xl dmesg` about domain `domid`: its own output ("(dN) ..."), Xen's lines
    naming it ("dNvM", "Domain N"), and the register dump that follows a fatal line."""
    mine = re.compile(rf"^\(d{domid}\) |\bd{domid}v\d+\b|\bDomain {domid}\b|\bd{domid}\b")
    out: list[str] = []
    dump = 0
    for line in dmesg.splitlines():
        if _XEN_NOISE.search(line):
            continue  # the toolstack saving/restoring HVM context at create: every HVM guest has them
        if mine.search(line):
            out.append(line)
            dump = 40 if first_match([line], XEN_FATAL) else dump
        elif dump and line.startswith("(XEN) "):
            out.append(line)
            dump -= 1
        else:
            dump = 0
    return out


def first_match(lines: Sequence[str], patterns: Sequence[re.Pattern[str]]) -> str | None:
    for line in lines:
        if any(p.search(line) for p in patterns):
            return line
    return None


def explain_with_xen_log(decision: Decision, xen_log: Sequence[str], domid: int | None) -> Decision:
    """A verdict that is not a pass, told again with what Xen's log says: a domain Xen
    killed (triple fault...) is the test's `error` with Xen's line quoted, whatever the
    console showed; a firmware that found nothing to boot is quoted in the guest's
    no_output/timeout verdict (SeaBIOS prints only to Xen's log)."""
    fatal = first_match(xen_log, XEN_FATAL)
    if fatal is not None and decision.verdict is not Verdict.ERROR:
        return dataclasses.replace(
            decision, verdict=Verdict.ERROR, line=fatal.strip(), line_no=None, pattern=None,
            reason=f"Xen killed domain {domid} (see xen_log in the report; under nested emulation a fault of "
                   "the emulator, not a guest verdict)")
    no_boot = first_match(xen_log, FIRMWARE_NO_BOOT[:1]) or first_match(xen_log, FIRMWARE_NO_BOOT)
    if no_boot is not None and decision.verdict in (Verdict.NO_OUTPUT, Verdict.TIMEOUT, Verdict.ENDED):
        said = re.sub(r"^\(d\d+\) ", "", no_boot.strip())
        verdict = Verdict.NO_OUTPUT if decision.verdict is not Verdict.TIMEOUT else Verdict.TIMEOUT
        return dataclasses.replace(decision, verdict=verdict, line=said, line_no=None, pattern=None,
                                   reason=f"{decision.reason}; the firmware found no bootable disk")
    return decision


# ---------------------------------------------------------------------------------- run

class BootTest:
    """One boot test run. `run()` returns a BootResult and has written all its files."""

    def __init__(self, *, image: str, image_format: str, guest: GuestConfig, rules: Rules, disk: DiskServer,
                 out_dir: str | os.PathLike[str], profile: str = "default", xl: str = "xl",
                 runner: Runner | None = None, log_dir: str | None = None,
                 clock: Callable[[], float] = time.monotonic, liveness_interval: float = 1.0,
                 xen_log_interval: float = 3.0, faults: Sequence[str] = ()) -> None:
        self.image = image
        self.faults = tuple(faults)  # --fault specs our blkback was given: the report's fault section
        self.image_format = image_format
        self.guest = guest
        self.rules = rules
        self.disk = disk
        self.out_dir = Path(out_dir)
        self.profile = profile
        self.xl = xl
        self.runner = runner or SubprocessRunner()
        self.log_dir = log_dir
        self.clock = clock
        self.liveness_interval = liveness_interval
        # Every xl command asked again after a crash: in the report's notes (a repeat hides
        # nothing only when it is shown).
        self.xl_repeats: list[str] = []
        self.domain = XlDomain(guest.name, xl=xl, runner=self.runner, on_rerun=self.xl_repeats.append)
        # Xen's own log (`xl dmesg`) is read for HVM and PVH guests: the firmware's lines
        # (hvmloader, SeaBIOS; with Xen's guest_loglvl=all) and Xen's report of a domain it
        # killed (a triple fault) are there, not on the guest's console.
        self.read_xen_log = guest.guest_type in ("hvm", "pvh")
        self.xen_log_interval = xen_log_interval
        self._xen_log: list[str] = []
        self._xen_log_ok = True
        # Seconds from unpause to each boot milestone seen (MILESTONES), for the report.
        self.milestones: dict[str, float] = {}
        self.files = {
            "xl_cfg": str(self.out_dir / "xl.cfg"),
            "console_log": str(self.out_dir / "console.log"),
            "report": str(self.out_dir / "report.json"),
            "junit": str(self.out_dir / "junit.xml"),
        }

    # -- run

    def run(self) -> BootResult:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            Path(self.files["xl_cfg"]).write_text(render_xl_cfg(self.guest), encoding="utf-8")
            log = open(self.files["console_log"], "wb")  # noqa: SIM115 - closed in finally
        except OSError as err:
            raise BootTestError("boottest.output", f"cannot write to {self.out_dir}: {err.strerror}") from None
        started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        t0 = self.clock()
        engine = VerdictEngine(self.rules, t0)
        console: Console | None = None
        create_tried = destroyed = False
        domid: int | None = None
        cleanup: list[str] = []
        disk_report: Mapping[str, object] | None = None
        create_out = ""
        # Seconds spent in each step, in order: where a slow run's time went.
        phases: dict[str, float] = {}
        mark = [t0]

        def phase(name: str) -> None:
            now = self.clock()
            phases[name] = round(phases.get(name, 0.0) + now - mark[0], 3)
            mark[0] = now

        try:
            try:
                log_path, offset = self._log_position()
                create_tried = True
                domid = self.domain.create(self.files["xl_cfg"])
                create_out = self.domain.create_output
                phase("create")
                self.disk.start(domid)
                phase("disk_start")
                console = self._attach(log_path, offset)
                self.domain.unpause()
                phase("unpause")
                # The guest's time starts now: timeouts count from the unpause.
                engine = VerdictEngine(self.rules, self.clock())
                self._watch(engine, console, log, domid)
                phase("guest")
            except XentoolsError as err:
                engine.error(self.clock(), str(err))
                if not self.domain.created and self.domain.create_failure:
                    create_out = self.domain.create_failure
            except OSError as err:
                engine.error(self.clock(), f"{err.strerror or err}")
            if domid is not None and self.read_xen_log:
                # Read once more while the domain's lines are fresh, before it is destroyed.
                self._poll_xen_log(domid)
        finally:
            if console is not None:
                with contextlib.suppress(OSError):
                    console.close()
            if "guest" not in phases:
                phase("until_error")  # the step that failed (or was interrupted)
            if create_tried:
                destroyed, why = self._destroy(self.domain.created)
                if why:
                    cleanup.append(why)
                phase("destroy")
            try:
                disk_report = self.disk.stop()
            except (XentoolsError, OSError) as err:
                cleanup.append(f"stopping the {self.disk.kind} disk backend failed: {err}")
            phase("disk_stop")
            log.close()
        assert engine.decision is not None
        decision = engine.decision
        if decision.verdict is not Verdict.PASS:
            decision = explain_with_xen_log(decision, self._xen_log, domid)
        if decision.verdict is not Verdict.ERROR or "verdict" not in self.milestones:
            self.milestones.setdefault("verdict", round(decision.elapsed, 3))
        notes = [f"{XL_REPEAT_NOTE}{what}" for what in self.xl_repeats]
        if self.read_xen_log and not self._xen_log_ok:
            notes.append("xl dmesg could not be read: no firmware lines, no crash report from Xen")
        elif self.read_xen_log and self.guest.guest_type == "hvm" and domid is not None and not any(
                line.startswith(f"(d{domid})") for line in self._xen_log):
            notes.append("Xen's log shows no firmware output for the guest: boot Xen with guest_loglvl=all "
                         "to see hvmloader's and SeaBIOS's lines")
        fault = None
        if self.faults:
            conformance = disk_report.get("conformance") if disk_report else None
            reaction = classify_reaction(_read_text(self.files["console_log"]), decision)
            fault = fault_section(self.faults, conformance, reaction, decision)  # type: ignore[arg-type]
        result = BootResult(
            fault=fault, name=self.guest.name, image=self.image, image_format=self.image_format, profile=self.profile,
            guest_type=self.guest.guest_type, backend=self.disk.kind,
            console_mode=self._console_mode(), decision=decision, started_at=started_at,
            duration=self.clock() - t0, files=dict(self.files), domid=domid, destroyed=destroyed,
            cleanup_errors=tuple(cleanup), disk_report=disk_report, xl_create_output=create_out, phases=phases,
            timeouts={"first_output": self.rules.first_output_timeout, "idle": self.rules.idle_timeout,
                      "boot": self.rules.boot_timeout, "prompt_grace": self.rules.prompt_grace},
            milestones=dict(self.milestones), xen_log=tuple(self._xen_log[-XEN_LOG_KEEP:]), notes=tuple(notes),
        )
        try:
            write_reports(result)
        except OSError as err:
            raise BootTestError("boottest.output", f"cannot write the reports to {self.out_dir}: {err.strerror}") from None
        return result

    def _log_position(self) -> tuple[Path | None, int]:
        if not self.log_dir:
            return None, 0
        path = console_log_path(self.log_dir, self.guest.name)
        try:
            return path, path.stat().st_size
        except FileNotFoundError:
            return path, 0

    def _console_mode(self) -> str:
        if self.log_dir:
            return "log"
        return "serial" if self.guest.guest_type == "hvm" else "xl"

    def _attach(self, log_path: Path | None, offset: int) -> Console:
        if log_path is not None:
            return LogConsole(log_path, offset)
        if self.guest.guest_type == "hvm":
            # An HVM guest's serial port is QEMU's emulated UART on a pty; xenconsoled's log
            # carries only the PV console, empty for a guest that writes to COM1.
            return self.runner.spawn_console([self.xl, "console", "-t", "serial", self.guest.name])
        return self.runner.spawn_console([self.xl, "console", self.guest.name])

    def _poll_xen_log(self, domid: int) -> None:
        """Keep Xen's log lines about the domain (see domain_xen_lines)."""
        if not self._xen_log_ok:
            return
        done = self.domain.run("dmesg")
        if done.returncode != 0:
            self._xen_log_ok = False
            return
        self._xen_log = domain_xen_lines(done.stdout, domid)

    def _milestone(self, name: str, now: float, start: float) -> None:
        if name not in self.milestones:
            self.milestones[name] = round(max(0.0, now - start), 3)

    def _milestones_from(self, engine: VerdictEngine, data: bytes, now: float) -> None:
        start = engine.start
        if data:
            g = self.guest
            self._milestone("bootloader" if g.guest_type == "hvm" or not g.kernel or g.kernel_is_bootloader
                            else "kernel", now, start)
            text = data.decode("utf-8", "replace")
            self._recent = (self._recent + text)[-4096:]
            if KERNEL_LINE.search(self._recent):
                self._milestone("kernel", now, start)
            if BLKFRONT_LINE.search(self._recent):
                self._milestone("blkfront_connected", now, start)
        if self._xen_log and any(line.startswith("(d") for line in self._xen_log):
            self._milestone("firmware", now, start)

    def _watch(self, engine: VerdictEngine, console: Console, log: IO[bytes], domid: int | None = None) -> None:
        next_check = self.clock() + self.liveness_interval
        next_xen_log = self.clock() + min(1.0, self.xen_log_interval)
        self._recent = ""
        gave_up: float | None = None  # when the frontend marked its disk broken (--fault)
        while True:
            now = self.clock()
            if engine.tick(now) is not None:
                return
            wait = max(0.0, min(engine.next_deadline() - now, READ_SLICE))
            data = console.read(wait)
            now = self.clock()
            if data is None:
                if console.mode != "log" and self.domain.alive(confirm=True):
                    # The guest is there but its console reader is gone: xl console could
                    # not attach (or died). No verdict on the guest can come from that.
                    engine.error(now, f"{console.ended_why()} while the guest still runs: the console could "
                                      "not be read (xl console needs /run/lock and xenconsoled)")
                    return
                engine.finish(now, "the console closed")
                return
            if data:
                log.write(data)
                log.flush()
            self._milestones_from(engine, data, now)
            if engine.feed(data, now) is not None:
                return
            if self.faults:
                if gave_up is None and data and disk_given_up(self._recent):
                    gave_up = now
                if gave_up is not None and now - gave_up >= FAULT_SETTLE:
                    engine.finish(now, f"the frontend gave its disk up {FAULT_SETTLE:g} s before")
                    return
            if domid is not None and self.read_xen_log and now >= next_xen_log:
                next_xen_log = now + self.xen_log_interval
                self._poll_xen_log(domid)
                self._milestones_from(engine, b"", now)
                fatal = first_match(self._xen_log, XEN_FATAL + FIRMWARE_NO_BOOT[1:])
                if fatal is not None:
                    # Xen killed the domain, or the firmware found nothing to boot and will
                    # only retry: decide now (run() quotes Xen's lines in the verdict).
                    engine.finish(now, "Xen's log ended the boot")
                    return
            if now >= next_check:
                next_check = now + self.liveness_interval
                if self.disk.connected():
                    self._milestone("blkfront_connected", now, engine.start)
                # A disk backend that died leaves the guest waiting for its disk: that is
                # the test's error, not the guest's timeout.
                why = self.disk.failure()
                if why is not None:
                    engine.error(now, why)
                    return
                if console.mode == "log" and not self.domain.alive(confirm=True):
                    rest = console.read(0.0) or b""
                    log.write(rest)
                    engine.feed(rest, now)
                    engine.finish(now, "the domain is gone")
                    return

    def _destroy(self, created: bool) -> tuple[bool, str | None]:
        """Destroy the guest; (gone, why not). A domain that is already gone counts as gone;
        after a failed `xl create` a missing domain is expected, not an error."""
        try:
            detail = self.domain.destroy()
            if detail is None:
                return True, None
        except (XentoolsError, OSError) as err:
            if not created:
                return False, None
            detail = str(err)
        return False, f"xl destroy {self.guest.name} failed: {detail}; the guest may still be running"
