"""Bootable RAW (and VHD) guest images for the HVM / pvgrub2 / PVH boot tests, built without
root and without mounts.

Owns: `make_boot_image`, which writes a RAW disk: an MBR with syslinux's boot code, one
bootable FAT16 partition at 1 MiB holding syslinux (its loader, `syslinux.cfg` for an HVM
guest booted by SeaBIOS) and `boot/grub/grub.cfg` (for pvgrub2, a PV guest), Debian's kernel
and a busybox initramfs (tests/xen/guests.py's builder) whose scenario "hvm-read" reads the
whole disk through xen-blkfront and prints its sha256, then a login prompt; `make_vhd`, the
same image as a dynamic VHD (qemu-img), for the refusal and the forced-as-RAW proof.
`boot_test_argv` is the one place that spells the `xentools image boot-test` command line the
nested boot-test suites (HVM, image boot, fault matrix) and the stress run (tests/xen/hvm_stress.py)
use, with the settings nested HVM needs (`hvm_options`, NESTED_HVM_CFG, why there) and those of
a PV test guest of tests/xen/guests.py on our blkback (`pv_options`).
Must not: decide a verdict (tests/xen/test_hvm_boot.py and hvm_stress.py do).

Tools (Debian packages in the Makefile's XEN_DEBS): sfdisk (fdisk), mkfs.fat (dosfstools),
mcopy/mmd (mtools), syslinux --install --offset (syslinux: the mtools-based installer that
writes into an image file), /usr/lib/syslinux/mbr/mbr.bin (syslinux-common), qemu-img
(qemu-utils). Facts: /work/shared/docs/xen-in-qemu.md, "HVM guests".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from guests import CONSOLE_LOG_DIR, GuestError, Kernel, build_initramfs, record_rerun

from xentools.tools.images.boottest import XL_REPEAT_NOTE

SECTOR = 512
PART_START = 2048  # sectors: 1 MiB, where partitioning tools put the first partition
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
PROMPT = "xentools-guest login:"
# What the guest prints for the disk it read through xen-blkfront (see SCENARIO).
DISK_LINE = "disk xvda sha256 "

# The guest's scenario, sourced by tests/xen/guest_init/init (its helpers: load_module,
# wait_for_block, say, fail, run). Besides the disk's digest it lists the PCI storage
# controllers still present after Linux's Xen platform-device unplug: whether QEMU removed
# the emulated IDE / AHCI controller's disk is what --emulated-disk's help states.
SCENARIO = r"""# GUEST SIDE scenario "hvm-read" (tests/xen/hvm_images.py): read the whole disk xvda
# through xen-blkfront, print its sha256, the PCI storage controllers left, then a prompt.
load_module xen-blkfront
wait_for_block xvda
for _dev in /sys/bus/pci/devices/*; do
    read -r _class < "$_dev/class"
    case "$_class" in
        0x0101*|0x0106*) say "pci storage ${_dev##*/} class $_class" ;;
    esac
done
run sha256sum /dev/xvda > /tmp/sum || fail "sha256sum /dev/xvda failed"
read -r sum _ < /tmp/sum
say "disk xvda sha256 $sum"
XT_then=${XT_then:-wait}
prompt='xentools-guest login: '
"""


@dataclass(frozen=True)
class BootImage:
    path: Path
    size: int
    sha256: str
    kernel: Path     # the bzImage inside the image (also given to PVH guests as --kernel)
    initramfs: Path  # the initramfs inside the image (also given as --ramdisk)
    hvm_cmdline: str
    pv_cmdline: str


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/sbin/{name}" if Path(f"/sbin/{name}").exists() else None)
    if path is None:
        raise GuestError(f"no {name} (Debian package {package}): make debs-xen installs it")
    return path


def _run(argv: list[str], **kw) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    if result.returncode != 0:
        raise GuestError(f"{' '.join(argv[:3])} ... exited {result.returncode}: {(result.stderr or result.stdout).strip()}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_boot_image(path: Path, kernel: Kernel, work: Path, *, size_mib: int = 32) -> BootImage:
    """Write the bootable RAW image at `path` (see the module docstring)."""
    if not MBR_CODE.is_file():
        raise GuestError(f"no {MBR_CODE} (Debian package syslinux-common): make debs-xen installs it")
    sfdisk, mkfs, mcopy, mmd = (_tool("sfdisk", "fdisk"), _tool("mkfs.fat", "dosfstools"),
                                _tool("mcopy", "mtools"), _tool("mmd", "mtools"))
    syslinux = _tool("syslinux", "syslinux")
    initramfs = build_initramfs(work / "initrd.img", kernel=kernel, scenarios=(),
                                modules=("xen-blkfront",), extra_files={"scenarios/hvm-read.sh": SCENARIO.encode()})
    # Linux's decompressor and the kernel write to the emulated UART (HVM) or the PV console
    # (pvgrub2, PVH). HVM: earlyprintk=serial makes the decompressor talk on COM1 (console=
    # ttyS0 alone does not), loglevel=1 rather than quiet lets it: its lines ("Booting the
    # kernel") mark the kernel milestone, while the kernel's own messages stay off the UART
    # (each byte is an exit to QEMU in dom0 under nested TCG). PV: loglevel=6 keeps
    # "Linux version" (a notice) for the same milestone; the PV console is a shared ring.
    hvm_cmdline = "console=ttyS0,115200 earlyprintk=serial,ttyS0,115200 loglevel=1 xentools.scenario=hvm-read"
    pv_cmdline = "console=hvc0 loglevel=6 xentools.scenario=hvm-read"
    total = size_mib << 20
    with open(path, "wb") as f:
        f.truncate(total)
    # One bootable FAT16 (type 0x06) partition from 1 MiB to the end.
    _run([sfdisk, "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
         input=f"label: dos\nstart={PART_START}, type=6, bootable\n")
    fs_sectors = total // SECTOR - PART_START
    _run([mkfs, "-F", "16", "-n", "XENTOOLS", "--offset", str(PART_START), str(path), str(fs_sectors // 2)])
    target = f"{path}@@{PART_START * SECTOR}"
    cfg = work / "syslinux.cfg"
    # SERIAL first: syslinux then talks on COM1, which `xl console -t serial` reads.
    cfg.write_text(f"SERIAL 0 115200\nDEFAULT linux\nTIMEOUT 0\nPROMPT 0\nLABEL linux\n"
                   f"  KERNEL vmlinuz\n  APPEND initrd=initrd.img {hvm_cmdline}\n")
    grub = work / "grub.cfg"
    grub.write_text(f"set timeout=0\nmenuentry 'xentools' {{\n  linux /vmlinuz {pv_cmdline}\n"
                    f"  initrd /initrd.img\n}}\n")
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    _run([mmd, "-i", target, "::boot", "::boot/grub"], env=env)
    _run([mcopy, "-i", target, str(kernel.vmlinuz), "::vmlinuz"], env=env)
    _run([mcopy, "-i", target, str(initramfs), "::initrd.img"], env=env)
    _run([mcopy, "-i", target, str(cfg), "::syslinux.cfg"], env=env)
    _run([mcopy, "-i", target, str(grub), "::boot/grub/grub.cfg"], env=env)
    _run([syslinux, "--install", "--offset", str(PART_START * SECTOR), str(path)], env=env)
    # The MBR's boot code (440 bytes): it loads the active partition's boot sector.
    code = MBR_CODE.read_bytes()[:440]
    with open(path, "r+b") as f:
        f.write(code)
    if path.stat().st_size != total:
        raise GuestError(f"{path}: the tools left {path.stat().st_size} bytes, not {total}")
    return BootImage(path, total, sha256_file(path), kernel.vmlinuz, initramfs, hvm_cmdline, pv_cmdline)


def make_vhd(raw: Path, out: Path) -> Path:
    """`raw` as a dynamic VHD (its first sector is the VHD copy footer, "conectix", not an
    MBR: a BIOS given it as a RAW disk finds no boot signature)."""
    _run([_tool("qemu-img", "qemu-utils"), "convert", "-f", "raw", "-O", "vpc", str(raw), str(out)])
    return out


# xl.cfg lines every nested HVM guest gets (/work/shared/docs/xen-in-qemu.md, "HVM guests";
# tests/nested/README.md). tsc_mode='native': QEMU's emulated SVM reports the guest's RDTSCP
# as an RDTSC exit without next-RIP, which Xen cannot emulate, and the domain dies; native
# TSC mode lets the guest run RDTSC(P) without an exit.
NESTED_HVM_CFG = ("tsc_mode='native'",)
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BootRun:
    """One `xentools image boot-test` process (domain `name`) and the files it wrote to `out`;
    `label` names it in test output. Shared by the nested boot-test suites."""

    name: str
    out: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    label: str = ""

    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text())

    def junit(self) -> ET.Element:
        return ET.parse(self.out / "junit.xml").getroot()

    def console(self) -> str:
        path = self.out / "console.log"
        return path.read_bytes().decode("utf-8", "replace").replace("\r", "") if path.exists() else ""

    def explain(self) -> str:
        tail = "\n".join(self.console().splitlines()[-30:])
        log = self.out / "blkback-report.json.log"
        backend = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        try:
            xen = "\n".join(self.report().get("xen_log", [])[-40:])
        except (OSError, ValueError):
            xen = ""
        try:
            created = self.report().get("xl_create_output", "")
        except (OSError, ValueError):
            created = ""
        # libxl's logs of the domain (the device model's stderr lands in qemu-dm-NAME.log).
        logs = ""
        for path in (Path(f"/var/log/xen/qemu-dm-{self.name}.log"), Path(f"/var/log/xen/xl-{self.name}.log")):
            if path.exists():
                logs += f"{path}:\n{path.read_text(errors='replace')[-3000:]}\n"
        return (f"boot-test {self.label or self.name} exited {self.returncode} after {self.seconds:.1f} s\n"
                f"stdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}\nxl create said:\n{created}\n"
                f"{logs}console tail:\n{tail}\nXen's log of the domain:\n{xen}\nblkback log:\n{backend}")

    def summary(self) -> str:
        """One line for the test output: verdict, times, milestones."""
        try:
            r = self.report()
        except (OSError, ValueError):
            return f"{self.label or self.name}: exit {self.returncode} in {self.seconds:.1f} s (no report)"
        return (f"{self.label or self.name}: {r['verdict']} in {r['elapsed_s']:.1f} s after unpause ({self.seconds:.1f} s "
                f"in all); milestones {json.dumps(r.get('milestones_s'))}")


def boot_test_argv(image: Path, out: Path, name: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "xentools", "image", "boot-test", str(image), "--out", str(out),
            "--name", name, "--json", *options]


def hvm_options(backend: str, emulated_disk: str = "ahci") -> list[str]:
    # Read-only where it can be: libxl refuses read-only emulated disks (the qdisk guest gets
    # its image writable, and only reads it; the test checks it is unchanged).
    opts = ["--profile", "linux-hvm", "--backend", backend, "--emulated-disk", emulated_disk,
            "--memory", "256", "--vcpus", "1", *(["--read-only"] if backend == "xentools" else [])]
    for line in NESTED_HVM_CFG:
        opts += ["--xl-cfg", line]
    return opts


def pv_options(kernel: Path, ramdisk: Path, extra: str) -> list[str]:
    """A PV test guest (tests/xen/guests.py's kernel, initramfs and command line) with its
    disk on our blkback, its console read from xenconsoled's log (--log=guest
    --log-dir=CONSOLE_LOG_DIR, tests/nested/dom0/boot.sh)."""
    return ["--profile", "linux-pv", "--type", "pv", "--kernel", str(kernel), "--ramdisk", str(ramdisk),
            "--extra", extra, "--backend", "xentools", "--log-dir", str(CONSOLE_LOG_DIR), "--memory", "128"]


def boot_test(label: str, image: Path, out: Path, name: str, *options: str, timeout: float = 600) -> BootRun:
    """Run the CLI to its end (it destroys its guest whatever happens)."""
    began = time.monotonic()
    proc = subprocess.run(boot_test_argv(image, out, name, *options), cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    # The CLI's xl commands asked again after a crash (its reports' notes, one report a boot;
    # matrix rows have theirs below `out`): recorded like the tests' own re-runs.
    for report in sorted(out.rglob("report.json")):
        try:
            notes = json.loads(report.read_text()).get("notes", [])
        except (OSError, ValueError):
            continue
        for note in notes:
            if note.startswith(XL_REPEAT_NOTE):
                record_rerun(f"boot-test {label or name} ({report.parent.name}): {note}")
    return BootRun(name, out, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - began, label)


def results_root(tmp_path_factory, sub: str) -> Path:
    """Where a nested suite's boot-test runs write: under $NESTED_RESULTS, which the harness
    keeps on the host after dom0 powers off (reports and console logs stay readable when
    something fails), else a pytest temporary directory."""
    results = os.environ.get("NESTED_RESULTS")
    if results:
        root = Path(results) / sub
        root.mkdir(parents=True, exist_ok=True)
        return root
    return tmp_path_factory.mktemp(sub)


def disk_digest_read(console: str) -> str | None:
    """The sha256 the guest printed for the disk it read through xen-blkfront."""
    for line in console.splitlines():
        if "GUEST: " + DISK_LINE in line:
            return line.split(DISK_LINE, 1)[1].split()[0]
    return None
