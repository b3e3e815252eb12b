#!/usr/bin/env python3
"""HOST SIDE of the nested real-Xen harness: boot Xen + a Debian dom0 in QEMU, run one
command in dom0, and exit with that command's exit code.

Owns: finding the Debian-packaged pieces (Xen, the dom0 kernel and its modules, busybox,
QEMU), building the initramfs (busybox + the 9p/overlay modules + dom0/init, written by
xentools.tools.images.initramfs.Cpio), the test
guests' uncompressed kernel (guest_vmlinux, handed to dom0 as $NESTED_GUEST_KERNEL), booting
QEMU with the host's / shared read-only into dom0, a global timeout, and reading the verdict.
Must not: know what is being tested. What runs in dom0 lives in tests/nested/dom0/:
  dom0/init     stage 1, /init of the initramfs (busybox): overlay root, then stage 2
  dom0/boot.sh  stage 2, PID 1 in the host's userland: xenstored & co, the command, power off

Usage (from anywhere, with the repository's .venv; the command runs in the repository root
unless --cwd is given):
  .venv/bin/python tests/nested/run.py -- .venv/bin/python -m pytest -q tests/xen
  .venv/bin/python tests/nested/run.py --console -- xl info
In dom0 the command sees the host's whole file system (read-only below, writable overlay in
RAM above), the Xen toolstack up (C xenstored, xenconsoled, xl), the xen-* driver modules
loaded, $NESTED_RESULTS: a directory the host keeps (build/nested/run-*/results/) for
files the command wants to hand back (benchmark JSON, logs, guests' console logs), and
$NESTED_GUEST_KERNEL: the ELF image of dom0's kernel for PV test guests.

Exit code: the command's own, or 124 when the global timeout killed QEMU, or 125 when the
machine could not be booted or tested (missing prerequisite, dom0 setup failed), or 123 when
the emulated machine froze twice (QEMU idle for FROZEN_S; the first freeze is re-run, said). Missing
prerequisites are failures with a reason, never skips. Artefacts go to build/nested/ (the
Xen image, the initramfs, and one run-* directory per run holding the console log and the
results share).

Facts this rests on: /work/shared/docs/xen-in-qemu.md (smap=0 smep=0 under TCG, the
multiboot module syntax, the 9p options).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import lzma
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

try:
    # The kernel finder and the cpio writer shared with the test guests (tests/xen/guests.py).
    from xentools.tools.images.initramfs import Cpio, newest_kernel
except ModuleNotFoundError as err:
    sys.exit(f"nested: {err.name} is not importable: run this with the repository's virtual environment, "
             ".venv/bin/python tests/nested/run.py (make venv creates it)")

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = REPO / "build" / "nested"

XEN_GZ = Path("/boot/xen-4.17-amd64.gz")
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
# Xen's command line. smap=0 smep=0: under TCG the PV dom0 otherwise dies in its first
# instructions (#PF in create_bounce_frame). No "noreboot": a dom0 crash then ends QEMU
# (-no-reboot) instead of hanging until our timeout. guest_loglvl=all: HVM guests' firmware
# (hvmloader, SeaBIOS) prints only to Xen's console, and Xen's report of a domain it killed
# (triple fault) is a guest-level message; boot-test reads both from `xl dmesg`, whose ring
# conring_size makes big enough for a few HVM boots. spec-ctrl=eager-fpu: QEMU's -cpu max
# looks like an AMD CPU, for which Xen 4.17 switches PV vCPUs' FPU/SSE state lazily (CR0.TS
# and #NM); under TCG that lost register state between vCPUs: a domU's Python computed wrong
# bytes (random.randbytes) or died of SIGSEGV, and dom0's xl at the same time read its
# config as garbage (tests/xen/test_domu.py, 2026-11-27). Eager switching saves and restores
# every vCPU's state at each switch.
XEN_ARGS = ("console=com1 dom0_mem=1024M,max:1024M smap=0 smep=0 guest_loglvl=all conring_size=1m "
            "spec-ctrl=eager-fpu")
DOM0_ARGS = "console=hvc0 rdinit=/init quiet"
# Modules stage 1 needs before the host's / is visible; modprobe --show-depends orders them.
INITRAMFS_MODULES = ("9p", "9pnet_virtio", "virtio_pci", "overlay")
# Debian package for each prerequisite, for the failure message.
PACKAGE_OF = {
    "xen": "xen-hypervisor-4.17-amd64",
    "qemu": "qemu-system-x86",
    "kernel": "linux-image-amd64",
    "busybox": "busybox-static",
    "modprobe": "kmod",
    "xenstored": "xen-utils-4.17",
    "xenstore-read": "xenstore-utils",
}
KEEP_RUNS = 5
# One vCPU for the nested machine (QEMU then runs one TCG thread). Reasons, measured on this
# project's 2-core machines (tests/nested/README.md, "HVM and PVH guests"): nested HVM
# guests triple-faulted with 2 vCPUs (of 5 boots at -smp 2: 2 passes, 2 triple faults, 1
# timeout) and not with 1 (every boot at -smp 1 passed so far, see the README's figures);
# and with other load on the host, 2 vCPUs under multi-threaded TCG slow down about 3x,
# 1 does not. `--smp 2` / NESTED_SMP=2 stays available.
DEFAULT_SMP = 1

EXIT_TIMEOUT = 124
EXIT_CANNOT_TEST = 125
EXIT_FROZEN = 123
# The emulated machine froze when QEMU spends no CPU time at all for FROZEN_S seconds: its
# vCPU thread waits to be woken and no timer ever wakes it (seen once, session 14: QEMU idle
# at 0% for 20 minutes while an HVM guest's Linux started in the nested Xen, dom0 silent too).
# A live machine never does that: dom0's own timers (the command's timeouts and sleeps)
# keep it busy, even idle, and a TCG vCPU costs CPU whenever it runs. Such a run is the
# emulator's fault, not the command's: it is booted again once (FROZEN_RERUNS), said on
# stderr with the reason, and counted in the last line.
FROZEN_S = 120.0
FROZEN_RERUNS = 1
RERUN_LOG_ENV = "NESTED_RERUN_LOG"  # a file each such re-run is also appended to (one line)


class HarnessError(Exception):
    """The nested machine could not be built or booted; the message says why."""


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path


def log(message: str) -> None:
    print(f"nested: {message}", file=sys.stderr, flush=True)


def missing(what: str, detail: str) -> HarnessError:
    return HarnessError(f"missing prerequisite: {detail} (Debian package {PACKAGE_OF[what]})")


def find_kernel() -> Kernel:
    """The newest /boot/vmlinuz-* whose modules are installed (dom0 loads them via 9p)."""
    found = newest_kernel()
    if found is None:
        raise missing("kernel", "no /boot/vmlinuz-* with /lib/modules/<version>/modules.dep")
    return Kernel(*found)


def is_static_elf(path: Path) -> bool:
    """True if the ELF file has no PT_INTERP program header (needs no dynamic loader)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit little-endian
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        p_type = int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little")
        if p_type == 3:  # PT_INTERP
            return False
    return True


def check_prerequisites() -> Kernel:
    if not XEN_GZ.is_file():
        raise missing("xen", str(XEN_GZ))
    if shutil.which(QEMU) is None:
        raise missing("qemu", QEMU)
    if not BUSYBOX.is_file() or not is_static_elf(BUSYBOX):
        raise missing("busybox", f"a statically linked {BUSYBOX}")
    if shutil.which("modprobe") is None and not Path("/sbin/modprobe").exists():
        raise missing("modprobe", "modprobe")
    if not Path("/usr/lib/xen-4.17/bin/xenstored").exists():
        raise missing("xenstored", "/usr/lib/xen-4.17/bin/xenstored")
    if shutil.which("xenstore-read") is None:
        raise missing("xenstore-read", "xenstore-read")
    return find_kernel()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a unique temporary file and rename: concurrent runs never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def xen_image(cache: Path) -> Path:
    """QEMU's -kernel boots the gunzipped image (an ELF32 multiboot binary) directly."""
    image = cache / "xen-4.17-amd64"
    if not image.exists() or image.stat().st_mtime < XEN_GZ.stat().st_mtime:
        atomic_write(image, gzip.decompress(XEN_GZ.read_bytes()))
    return image


def guest_vmlinux(cache: Path, kernel: Kernel) -> Path:
    """The dom0 kernel's uncompressed ELF image, for test guests (tests/xen/guests.py).

    `xl create` given the bzImage decompresses its xz payload in dom0, which takes ~5 s
    under nested TCG; given this ELF it takes ~0.7 s. Decompressed once here on the host
    and cached by mtime. The payload is located by the x86 boot protocol's setup header
    (payload_offset/payload_length at 0x248, protected-mode code at (setup_sects + 1) * 512,
    boot protocol >= 2.08), not by scanning for a magic number. Returns the bzImage itself
    when the payload is not xz or gzip (guests then boot it, only slower to create)."""
    out = cache / f"vmlinux-{kernel.version}"
    if out.exists() and out.stat().st_mtime >= kernel.vmlinuz.stat().st_mtime:
        return out
    data = kernel.vmlinuz.read_bytes()
    if data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        return kernel.vmlinuz
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start : start + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        # The build appends the uncompressed size after the stream: the decompressor stops
        # at the stream's end and leaves those bytes unused.
        image = lzma.LZMADecompressor().decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        image = zlib.decompressobj(wbits=31).decompress(payload)
    else:
        return kernel.vmlinuz
    if not image.startswith(b"\x7fELF"):
        return kernel.vmlinuz
    atomic_write(out, image)
    return out


def module_paths(kernel: Kernel) -> list[Path]:
    """Module files for INITRAMFS_MODULES in load order, without repeats (builtins skipped)."""
    modprobe = shutil.which("modprobe") or "/sbin/modprobe"
    paths: list[Path] = []
    for name in INITRAMFS_MODULES:
        out = subprocess.run(
            [modprobe, "-S", kernel.version, "--show-depends", name],
            check=True, capture_output=True, text=True,
        ).stdout
        for line in out.splitlines():
            words = line.split()
            if words and words[0] == "insmod":
                path = Path(words[1])
                if path not in paths:
                    paths.append(path)
    return paths


def build_initramfs(cache: Path, kernel: Kernel) -> Path:
    archive = Cpio()
    for name in ("bin", "dev", "proc", "sys", "modules"):
        archive.directory(name)
    # The kernel opens /dev/console for init before init can mount devtmpfs.
    archive.chardev("dev/console", 5, 1)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), executable=True)
    archive.file("init", (HERE / "dom0" / "init").read_bytes(), executable=True)
    order = []
    for path in module_paths(kernel):
        archive.file(f"modules/{path.name}", path.read_bytes())
        order.append(path.name)
    archive.file("modules/order", "".join(f"{name}\n" for name in order).encode())
    out = cache / f"initramfs-{kernel.version}.cpio"
    atomic_write(out, archive.finish())
    return out


def _in_use(run: Path) -> bool:
    """True while another run.py holds the run directory's lock (its QEMU writes there)."""
    try:
        fd = os.open(run / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def new_run_dir(cache: Path) -> tuple[Path, int]:
    """A fresh run directory, locked for this process's life (the fd returned); the oldest
    runs beyond KEEP_RUNS are removed, except those another run.py still uses (several
    runs at once share build/nested/)."""
    runs = sorted(cache.glob("run-*"), key=lambda p: p.stat().st_mtime)
    for old in runs[: max(0, len(runs) - (KEEP_RUNS - 1))]:
        if not _in_use(old):
            shutil.rmtree(old, ignore_errors=True)
    run = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=cache))
    lock = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    (run / "results").mkdir()
    return run, lock


def no_separators(path: Path) -> str:
    # QEMU splits -initrd on "," and a module's path from its arguments on " ".
    text = str(path)
    if "," in text or " " in text:
        raise HarnessError(f"path {text!r} contains ',' or ' ', which QEMU's -initrd cannot carry")
    return text


COMMAND_START = "nested-dom0: running"
COMMAND_END = "nested-dom0: command exited"


class Console:
    """Collects QEMU's stdout (Xen's com1, which carries dom0's hvc0) with timestamps, and
    echoes either all of it or only the command's own lines (between the two markers)."""

    def __init__(self, stream, logfile: Path, echo_all: bool, start: float) -> None:
        self.lines: list[tuple[float, str]] = []
        self._stream = stream
        self._log = open(logfile, "w", encoding="utf-8", errors="replace")
        self._echo_all = echo_all
        self._in_command = False
        self._start = start
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
            self.lines.append((time.monotonic() - self._start, line))
            self._log.write(line + "\n")
            self._log.flush()
            if line.startswith(COMMAND_END):
                self._in_command = False
            if self._echo_all or self._in_command:
                print(line, flush=True)
            if line.startswith(COMMAND_START):
                self._in_command = True

    def join(self) -> None:
        self._thread.join(timeout=5)
        self._log.close()

    def first(self, marker: str) -> float | None:
        return next((t for t, line in self.lines if marker in line), None)

    def tail(self, n: int) -> list[str]:
        return [line for _, line in self.lines[-n:]]


def boot(args: argparse.Namespace) -> int:
    kernel = check_prerequisites()
    cache = Path(args.cache_dir).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    xen = xen_image(cache)
    initramfs = build_initramfs(cache, kernel)
    vmlinux = guest_vmlinux(cache, kernel)
    run, _lock = new_run_dir(cache)
    results = run / "results"
    cwd = Path(args.cwd).resolve()
    for hidden in ("/run", "/proc", "/sys", "/dev"):
        # dom0 mounts its own file systems there, hiding the host's.
        if cwd == Path(hidden) or Path(hidden) in cwd.parents:
            raise HarnessError(f"--cwd {cwd} is under {hidden}, which dom0 does not see from the host")
    # Same HOME as on the host: caches under ~ (e.g. the barrier) built there are reused.
    home = os.environ.get("HOME", "/root")
    # NESTED_GUEST_KERNEL: what tests/xen/guests.py boots guests with (see guest_vmlinux).
    (results / "command").write_text(
        f"export HOME={shlex.quote(home)} NESTED_GUEST_KERNEL={shlex.quote(str(vmlinux))}\n"
        f"exec {shlex.join(args.command)}\n"
    )
    (results / "cwd").write_text(f"{cwd}\n")

    boot_script = HERE / "dom0" / "boot.sh"
    dom0_args = f"{DOM0_ARGS} nested.boot={no_separators(boot_script)}"
    qemu = [
        QEMU, "-M", "q35", "-cpu", "max", "-m", "2048", "-smp", str(args.smp),
        "-nographic", "-no-reboot",
        "-kernel", str(xen),
        "-append", XEN_ARGS,
        "-initrd", f"{no_separators(kernel.vmlinuz)} {dom0_args},{no_separators(initramfs)}",
        "-virtfs", "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={no_separators(results)},mount_tag=results,security_model=none,multidevs=remap",
        *args.qemu_arg,
    ]
    log(f"run directory {run}")
    log(f"Xen {XEN_GZ.name}, dom0 kernel {kernel.version}, command: {shlex.join(args.command)}")
    start = time.monotonic()
    proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = Console(proc.stdout, run / "console.log", args.console, start)
    exit_file = results / "exit-code"
    timed_out = frozen = False
    verdict_seen: float | None = None
    busy, busy_at = qemu_cpu_ticks(proc.pid), start
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now - start > args.timeout:
                timed_out = True
                break
            ticks = qemu_cpu_ticks(proc.pid)
            if ticks != busy:
                busy, busy_at = ticks, now
            elif now - busy_at > FROZEN_S:
                frozen = True
                break
            if verdict_seen is None and exit_file.exists():
                verdict_seen = now
            # dom0 powers off right after writing the verdict; do not wait long for Xen.
            if verdict_seen is not None and now - verdict_seen > 20:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        console.join()
    elapsed = time.monotonic() - start

    stages = [
        ("dom0 stage 1", console.first("nested-init: stage 1")),
        ("toolstack up", console.first("toolstack up")),
        ("command start", console.first(COMMAND_START)),
        ("verdict", console.first("nested-dom0: verdict")),
    ]
    seen = [f"{name} {t:.1f} s" for name, t in stages if t is not None]
    log("timings since QEMU start: " + ", ".join([*seen, f"QEMU gone {elapsed:.1f} s"]))
    version = results / "xen-version"
    if version.exists():
        log(f"xl info: xen_version {version.read_text().strip()}")
    output = results / "output"
    if output.exists():
        # The console copy above may interleave kernel messages; this file is exact.
        lines = [line for line in output.read_text(errors="replace").splitlines() if line.strip()]
        if args.show_output:
            for line in lines[:-1]:
                log(f"command: {line}")
        log(f"command's last line: {lines[-1] if lines else '(no output)'}  [{output}]")

    dmesg = results / "dom0-dmesg.log"
    if dmesg.exists():
        # User-space crashes in dom0 (under lazy FPU switching, before eager-fpu, PV processes
        # died at birth; tests/nested/README.md): counted so that none goes unnoticed.
        crashes = [line for line in dmesg.read_text(errors="replace").splitlines()
                   if "segfault at" in line or "general protection fault" in line]
        if crashes:
            log(f"dom0 kernel log: {len(crashes)} user-space crash(es), e.g. {crashes[0].strip()}  [{dmesg}]")
    rc: int | None = None
    if exit_file.exists():
        text = exit_file.read_text().strip()
        rc = int(text) if text.isdigit() else None
    if frozen:
        log(f"FAIL: the emulated machine froze: QEMU used no CPU for {FROZEN_S:.0f} s (at {elapsed:.0f} s); "
            "QEMU killed. Console tail:")
        rc = EXIT_FROZEN
    elif timed_out:
        log(f"FAIL: timeout after {args.timeout:.0f} s; QEMU killed. Console tail:")
        rc = EXIT_TIMEOUT
    elif rc is None:
        log("FAIL: dom0 wrote no verdict (crash or setup failure). Console tail:")
        rc = EXIT_CANNOT_TEST
    elif rc == EXIT_CANNOT_TEST:
        log("FAIL: dom0 setup failed. Console tail:")
    if rc in (EXIT_TIMEOUT, EXIT_CANNOT_TEST, EXIT_FROZEN) and not args.console:
        for line in console.tail(args.tail):
            print(f"  | {line}", file=sys.stderr)
        dom0_log = results / "dom0.log"
        if dom0_log.exists() and dom0_log.stat().st_size:
            log("dom0.log:")
            sys.stderr.write(dom0_log.read_text(errors="replace"))
    log(f"full console: {run / 'console.log'}; exit {rc}")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Boot Xen + dom0 in QEMU (TCG), run COMMAND in dom0, exit with its code.",
        usage="%(prog)s [options] -- COMMAND [ARG...]",
    )
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("NESTED_TIMEOUT", 600)),
                        help="seconds from QEMU start until QEMU is killed (default 600, env NESTED_TIMEOUT)")
    parser.add_argument("--cwd", default=str(REPO), help="directory in dom0 to run COMMAND in (default: repo)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="build artefacts and run directories")
    parser.add_argument("--smp", type=int, default=int(os.environ.get("NESTED_SMP", DEFAULT_SMP)),
                        help=f"virtual CPUs (default {DEFAULT_SMP}, env NESTED_SMP; why: DEFAULT_SMP in run.py)")
    parser.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                        help="extra QEMU argument (repeat for each word)")
    parser.add_argument("--console", action="store_true",
                        help="echo the whole console (Xen and dom0 boot too), not only the command's lines")
    parser.add_argument("--tail", type=int, default=60, help="console lines shown on failure")
    parser.add_argument("--show-output", action="store_true",
                        help="show every line of the command's output at the end, not only its last one")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run in dom0 (after --)")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given; e.g. -- .venv/bin/python -m pytest -q tests/xen")
    reruns: list[str] = []
    try:
        while True:
            rc = boot(args)
            if rc != EXIT_FROZEN or len(reruns) == FROZEN_RERUNS:
                break
            reruns.append(f"the emulated machine froze (QEMU used no CPU for {FROZEN_S:.0f} s)")
            log(f"RE-RUN {len(reruns)} of at most {FROZEN_RERUNS}: the whole command, in a new boot: {reruns[-1]}")
            if os.environ.get(RERUN_LOG_ENV):  # make test prints these in its summary
                with open(os.environ[RERUN_LOG_ENV], "a") as f:
                    f.write(f"nested machine RE-RUN: {shlex.join(args.command)}: {reruns[-1]}\n")
    except HarnessError as err:
        log(f"FAIL: {err}")
        rc = EXIT_CANNOT_TEST
    if reruns:
        log(f"re-runs of the whole command: {len(reruns)}: " + "; ".join(reruns))
    return rc


def qemu_cpu_ticks(pid: int) -> int:
    """CPU time QEMU has used (user + system, in clock ticks, every thread), -1 when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)


if __name__ == "__main__":
    sys.exit(main())
