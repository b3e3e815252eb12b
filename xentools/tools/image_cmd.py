"""`xentools image`: fetch FreeBSD release images, inspect image files, boot-test them.

Owns: the click group `image` and its commands `fetch`, `inspect`, `boot-test`: options,
the progress bar on stderr, what goes to stdout (a path, a verdict line, or JSON), and the
boot test's exit codes (xtf-runner's: 0 pass, 4 error, 5 fail, 6 timeout), and the matrices'
loop (--fault-matrix, --config-matrix: one boot per row, each in its own directory, one
table; exit 4 if a row is an error, else 5 if one failed, else 0). A bad --fault spec or a
matrix option with another backend is one line and exit 2, before anything runs.
Must not: implement fetching, parsing or the boot test (xentools.tools.images does).

`fetch` and `inspect` leave errors to the CLI's policy (one line, exit 1); `boot-test`
reports its own errors with exit 4 so that a CI job can tell "the guest failed" (5, 6)
from "the test could not run" (4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from xentools.core.errors import XentoolsError
from xentools.devices.blkback_faults import GRANT_KINDS, KINDS, FaultSpecError, parse_faults
from xentools.tools.images.boottest import (
    BootTest,
    DiskServer,
    HostDisk,
    XentoolsDisk,
    domain_name,
    fit_guest,
    host_resources,
    preflight,
)
from xentools.tools.images.catalog import Catalog, Profile, load_catalog
from xentools.tools.images.diskformat import inspect_image
from xentools.tools.images.errors import BootTestError
from xentools.tools.images.matrix import (
    ConfigRow,
    MatrixRow,
    config_row,
    config_rows,
    fault_row,
    matrix_faults,
    matrix_lines,
    write_matrix,
)
from xentools.tools.images.fetch import Mirror, fetch_image, read_fetch_record
from xentools.tools.images.report import BootResult
from xentools.tools.images.verdict import Outcome, Rules
from xentools.tools.images.xl import GuestConfig


def default_dest() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "xentools", "vm-images")


class _QuietBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _progress(label: str, total: int | None) -> Iterator[object]:
    if total is None:
        click.echo(f"{label} (size unknown)", err=True)
        yield _QuietBar()
        return
    # click prints only the label once when stderr is not a terminal: CI logs stay short.
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False) as bar:
        yield bar


def _notice(message: str) -> None:
    click.echo(f"xentools: {message}", err=True)


@click.group("image")
def image() -> None:
    """Guest images: fetch release images, inspect image files, boot-test them under xl."""


@image.command("fetch")
@click.argument("release")
@click.option("--arch", default="amd64", show_default=True, help="Architecture (amd64, arm64).")
@click.option("--fs", type=click.Choice(["ufs", "zfs"]), default=None,
              help="File system of the image (default: the unsuffixed image, else UFS).")
@click.option("--mirror", default=None, metavar="URL",
              help="Root of a tree laid out like the FreeBSD download site: http(s)://, file:// or a directory.")
@click.option("--dest", default=default_dest, show_default="~/.cache/xentools/vm-images",
              type=click.Path(file_okay=False), help="Directory of the cache and the RAW image.")
@click.option("--catalog", default=None, type=click.Path(dir_okay=False), help="Catalog file (default: vm-images/catalog.toml).")
@click.option("--family", default="freebsd", show_default=True, help="Image family in the catalog.")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(0, 100),
              help="Resume an interrupted download this many times before giving up.")
@click.option("--retry-delay", default=1.0, show_default=True, type=click.FloatRange(0, 60), help="Seconds between retries.")
@click.option("--fresh", is_flag=True, help="Decompress again even if the RAW image is cached.")
@click.option("--keep-xz/--no-keep-xz", default=True, show_default=True, help="Keep the verified .xz as the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of the image's path.")
def fetch_cmd(release: str, arch: str, fs: str | None, mirror: str | None, dest: str, catalog: str | None,
              family: str, retries: int, retry_delay: float, fresh: bool, keep_xz: bool, as_json: bool) -> None:
    """Download, verify and decompress the VM image of RELEASE (14.1 or 14.1-RELEASE).

    Prints the path of the RAW image. An interrupted download is kept as <name>.part and
    resumed by the next run; it is used only after its checksum matched.
    """
    cat = load_catalog(catalog)
    fam = cat.family(family)
    ref = fam.ref(release, arch, fs)
    src = Mirror.parse(mirror if mirror is not None else cat.default_mirror)
    result = fetch_image(ref, src, Path(dest), profile=fam.profile_name(ref.release), retries=retries,
                         backoff=retry_delay, fresh=fresh, keep_compressed=keep_xz,
                         progress=_progress, notice=_notice)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(result.raw_path)


@image.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def inspect_cmd(file: str, as_json: bool) -> None:
    """Report the format of an image FILE: RAW (MBR/GPT partitions), VHD, qcow2, vmdk, ..."""
    info = inspect_image(file)
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2))
    else:
        for line in info.describe():
            click.echo(line)


def _choose_profile(cat: Catalog, name: str | None, image_path: str) -> Profile:
    if name:
        return cat.profile(name)
    record = read_fetch_record(Path(image_path))
    if record and isinstance(record.get("profile"), str):
        return cat.profile(str(record["profile"]))
    found = cat.profile_for_file(os.path.basename(image_path))
    return found if found is not None else cat.profile("default")


PVGRUB = ("/usr/lib/grub-xen/grub-x86_64-xen.bin", "grub-xen-host")
# Xen's emulated-device unplug protocol (docs/misc/hvm-emulated-unplug.pandoc: bit 0 "all
# emulated IDE and SCSI disks", bit 3 NVMe) has no AHCI: QEMU removes an IDE disk when the
# guest's PV drivers ask, an AHCI one stays.
EMULATED_DISK_HELP = ("HVM: the controller the firmware reads the disk through: ide (xl's default; removed by "
                      "Xen's unplug protocol when the guest's PV drivers start; slow under nested emulation, "
                      "~90 KB/s) or ahci (fast under emulation; the unplug protocol does not cover AHCI, so a "
                      "guest with an AHCI driver sees the disk twice, emulated and PV). Default: ide.")


def _results_dir(out_dir: str | None, results_dir: str | None, name: str) -> tuple[Path, bool]:
    """Where this run writes its files, and whether it is a temporary directory made here."""
    if out_dir:
        return Path(out_dir), False
    if results_dir:
        return Path(results_dir) / name, False
    return Path(tempfile.mkdtemp(prefix=f"xentools-boot-test-{name}-")), True


@image.command("boot-test")
@click.argument("image_path", metavar="IMAGE", type=click.Path(dir_okay=False))
@click.option("--profile", "profile_name", default=None,
              help="Catalog profile (default: the one fetch recorded, or the image name's, or 'default').")
@click.option("--catalog", default=None, type=click.Path(dir_okay=False), help="Catalog file.")
@click.option("--type", "guest_type", type=click.Choice(["hvm", "pv", "pvh"]), default=None,
              help="Guest type (default: the profile's; pv when --kernel or --bootloader is given to an hvm profile).")
@click.option("--kernel", default=None, type=click.Path(dir_okay=False), help="Kernel for a PV/PVH guest.")
@click.option("--ramdisk", default=None, type=click.Path(dir_okay=False), help="Initial ramdisk for --kernel.")
@click.option("--extra", default=None, help="Kernel command line for --kernel (default: the profile's).")
@click.option("--bootloader", type=click.Choice(["pvgrub"]), default=None,
              help="PV guest booted by pvgrub2 (Debian grub-xen-host): GRUB reads /boot/grub/grub.cfg, the kernel "
                   "and initrd from IMAGE through its own blkfront.")
@click.option("--firmware", type=click.Choice(["seabios", "ovmf"]), default=None,
              help="HVM firmware (xl.cfg bios=; default xl's, SeaBIOS).")
@click.option("--emulated-disk", type=click.Choice(["ide", "ahci"]), default=None, help=EMULATED_DISK_HELP)
@click.option("--xl-cfg", "xl_cfg", multiple=True, metavar="KEY=VALUE",
              help="Extra xl.cfg line, repeatable, e.g. --xl-cfg \"tsc_mode='native'\" (nested Xen under QEMU TCG).")
@click.option("--backend", type=click.Choice(["host", "qdisk", "xentools"]), default="host", show_default=True,
              help="Who serves the disk: the host's usual backend (disk= line, hotplug script), QEMU in dom0 "
                   "(backendtype=qdisk, no hotplug script), or xentools' blkback (an HVM guest's firmware then "
                   "reads the image through QEMU's emulated disk, its PV driver through our blkback).")
@click.option("--force-format", type=click.Choice(["raw"]), default=None,
              help="Boot IMAGE as RAW whatever format it is in (to reproduce what a guest does with it).")
@click.option("--vdev", default="xvda", show_default=True, help="The guest's name for the disk.")
@click.option("--read-only", is_flag=True, help="Give the guest the disk read-only.")
@click.option("--log-dir", default=None, type=click.Path(file_okay=False),
              help="xenconsoled's --log-dir: read guest-<name>.log instead of running xl console.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Directory for xl.cfg, console.log, report.json, junit.xml.")
@click.option("--results-dir", default=None, type=click.Path(file_okay=False),
              help="Write the files to RESULTS_DIR/<name> (default, without --out: a new temporary directory, "
                   "named on stderr).")
@click.option("--name", default=None, help="Domain name (default: xtbt-<image>-<pid>).")
@click.option("--memory", type=click.IntRange(16), default=None,
              help="MiB (default: the profile's, cut to what xl info says is free).")
@click.option("--vcpus", type=click.IntRange(1), default=None, help="Default: the profile's, at most the host's CPUs.")
@click.option("--first-output-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds to the first console byte (default: the profile's).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds without output before giving up, 0 off (default: the profile's).")
@click.option("--timeout", "boot_timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds to a verdict (default: the profile's).")
@click.option("--prompt-grace", type=click.FloatRange(min=0), default=None,
              help="Quiet seconds after an unterminated prompt before it counts.")
@click.option("--xl", default="xl", show_default=True, help="The xl command.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the verdict line.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help="--backend xentools: our blkback misbehaves (repeatable; KIND[:TRIGGER,...], the grammar and "
                   "kinds of `xentools blkback serve --help`); the report gains a fault section: when it fired, "
                   "the guest's reaction read from its console (crash, device-broken, io-error, hang, nothing) "
                   "and a verdict (fail: crash or hang).")
@click.option("--fault-matrix", is_flag=True,
              help="--backend xentools: one boot per fault kind (with --fault: per SPEC given), one table "
                   "(matrix.json, matrix-junit.xml: one test case per fault) in --out/--results-dir.")
@click.option("--config-matrix", "config_matrix", is_flag=False, flag_value="", default=None, metavar="[FILE]",
              help="--backend xentools: one boot per backend configuration (default: a pairwise covering of ring "
                   "order 0/max, indirect 0/32/256/4096, persistent on/off, 1/4 queues, 512/4096-byte sectors, "
                   "discard on/off, read-only; FILE: a JSON list of objects with those knobs), one table of "
                   "negotiated values, requests, violations and verdicts.")
@click.pass_context
def boot_test_cmd(ctx: click.Context, image_path: str, profile_name: str | None, catalog: str | None,
                  guest_type: str | None, kernel: str | None, ramdisk: str | None, extra: str | None,
                  bootloader: str | None, firmware: str | None, emulated_disk: str | None, xl_cfg: tuple[str, ...],
                  backend: str, force_format: str | None, vdev: str, read_only: bool, log_dir: str | None,
                  out_dir: str | None, results_dir: str | None, name: str | None, memory: int | None,
                  vcpus: int | None, first_output_timeout: float | None, idle_timeout: float | None,
                  boot_timeout: float | None, prompt_grace: float | None, xl: str, as_json: bool,
                  faults: tuple[str, ...], fault_matrix: bool, config_matrix: str | None) -> None:
    """Boot IMAGE under xl and decide: pass (login prompt), fail (panic, mountroot, guest
    gone), timeout (no verdict, or no output at all), error (the test could not run, or Xen
    killed the guest).

    The guest is created paused, its console attached (an HVM guest's serial port, `xl
    console -t serial`), then unpaused; it is always destroyed at the end. Exit codes: 0
    pass, 4 error, 5 fail, 6 timeout. With --fault the fault's verdict decides; a matrix exits
    4 if a row is an error, else 5 if one failed, else 0.
    """
    fault_specs, configs = _check_kit_options(ctx, backend, faults, fault_matrix, config_matrix)
    try:
        cat = load_catalog(catalog)
        profile = _choose_profile(cat, profile_name, image_path)
        if bootloader == "pvgrub":
            if kernel:
                raise BootTestError("boottest.bootloader", "--bootloader pvgrub loads the kernel from IMAGE: "
                                                           "give --kernel or --bootloader, not both")
            if guest_type not in (None, "pv"):
                raise BootTestError("boottest.bootloader", "pvgrub2 boots PV guests: drop --type or give --type pv")
            if not os.path.isfile(PVGRUB[0]):
                raise BootTestError("boottest.bootloader", f"no {PVGRUB[0]}: apt-get install {PVGRUB[1]}")
            kernel = PVGRUB[0]
        kind = guest_type or ("pv" if kernel and profile.guest_type == "hvm" else profile.guest_type)
        if kind != "hvm" and (firmware or emulated_disk):
            raise BootTestError("boottest.hvm_only", f"--firmware and --emulated-disk are for HVM guests, not {kind}")
        if kind == "hvm" and read_only and backend != "xentools":
            raise BootTestError("boottest.read_only", "an HVM guest's emulated disk cannot be read-only (libxl and "
                                                      "QEMU refuse it): drop --read-only, or use --backend xentools "
                                                      "(the firmware then reads a snapshot, the PV driver our "
                                                      "read-only vbd)")
        info, xl_path = preflight(image_path, xl=xl, kernel=kernel, ramdisk=ramdisk, guest_type=kind,
                                  firmware=firmware, extra_cfg=xl_cfg, force_format=force_format)
        rules = Rules.build(
            profile.patterns,
            first_output_timeout=first_output_timeout or profile.first_output_timeout,
            boot_timeout=boot_timeout or profile.boot_timeout,
            idle_timeout=profile.idle_timeout if idle_timeout is None else idle_timeout,
            prompt_grace=profile.prompt_grace if prompt_grace is None else prompt_grace,
        )
        host = host_resources(xl_path)
        memory_mb, nr_vcpus = fit_guest(kind, host, memory=memory, vcpus=vcpus,
                                        default_memory=profile.memory_mb, default_vcpus=profile.vcpus)
        dom = name or domain_name(image_path)
        out, temporary = _results_dir(out_dir, results_dir, dom)
        if temporary:
            _notice(f"results go to {out} (name a directory with --results-dir or --out)")
        guest = GuestConfig(
            name=dom, guest_type=kind, memory_mb=memory_mb, vcpus=nr_vcpus,
            kernel=os.path.abspath(kernel) if kernel else None,
            ramdisk=os.path.abspath(ramdisk) if ramdisk else None,
            extra=extra if extra is not None else (profile.extra if kernel and not bootloader else None),
            firmware=firmware, extra_cfg=tuple(xl_cfg), kernel_is_bootloader=bootloader is not None,
        )

        def boot(run_out: Path, run_name: str, *, ro: bool = read_only, options: tuple[str, ...] = (),
                 with_faults: tuple[str, ...] = ()) -> BootResult:
            disk: DiskServer
            if backend == "xentools":
                fault_options = tuple(arg for spec in with_faults for arg in ("--fault", spec))
                disk = XentoolsDisk(image_path, report_path=str(run_out / "blkback-report.json"), vdev=vdev,
                                    writable=not ro, blkback_options=options + fault_options)
            else:
                disk = HostDisk(image_path, vdev=vdev, writable=not ro,
                                backendtype="qdisk" if backend == "qdisk" else None)
            dm_args = tuple(disk.device_model_args(emulated_disk or "ide")) if kind == "hvm" else ()
            cfg = dataclasses.replace(guest, name=run_name, disks=tuple(disk.xl_disks()), device_model_args=dm_args,
                                      emulated_disk=emulated_disk if not dm_args else None)
            test = BootTest(image=os.path.abspath(image_path), image_format=info.format, guest=cfg, rules=rules,
                            disk=disk, out_dir=run_out, profile=profile.name, xl=xl_path, log_dir=log_dir,
                            faults=with_faults)
            return test.run()

        if fault_matrix or config_matrix is not None:
            matrix = "fault-matrix" if fault_matrix else "config-matrix"
            rows = _run_matrix(matrix, boot, out, dom, read_only, rules.idle_timeout, configs, fault_specs)
            files = write_matrix(out, matrix, profile.name, os.path.abspath(image_path), rows)
        else:
            result = boot(out, dom, with_faults=fault_specs)
    except XentoolsError as err:
        click.echo(f"xentools: error: {err}", err=True)
        ctx.exit(Outcome.ERROR.exit_code)
    if fault_matrix or config_matrix is not None:
        if as_json:
            click.echo(Path(files["json"]).read_text(encoding="utf-8").rstrip())
        else:
            for line in matrix_lines(matrix, rows):
                click.echo(line)
        click.echo(f"xentools: matrix {files['json']}, junit {files['junit']}", err=True)
        verdicts = {row.verdict for row in rows}
        ctx.exit(Outcome.ERROR.exit_code if "error" in verdicts else
                 Outcome.FAIL.exit_code if "fail" in verdicts else Outcome.PASS.exit_code)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        summary = result.summary()
        # summary() starts with the verdict; say the outcome once ("error: xl create ...",
        # "fail: panic: ...", never "error: error: ...").
        line = summary if summary.startswith(f"{result.outcome.label}:") else f"{result.outcome.label}: {summary}"
        if result.cleanup_errors:
            line += "; " + "; ".join(result.cleanup_errors)
        click.echo(line)
        click.echo(f"xentools: console log {result.files['console_log']}, report {result.files['report']}, "
                   f"junit {result.files['junit']}", err=True)
    ctx.exit(result.exit_code)


# Seconds a `late` fault holds its answer in the fault matrix when no idle timeout bounds it.
MATRIX_LATE_DELAY = 10.0


def _check_kit_options(ctx: click.Context, backend: str, faults: tuple[str, ...], fault_matrix: bool,
                       config_matrix: str | None) -> tuple[tuple[str, ...], list[ConfigRow]]:
    """The --fault specs and the configuration rows, checked before anything runs; a bad
    one, or a test-kit option that cannot be used as given, is one line and exit 2."""
    configs: list[ConfigRow] = []
    problem = None
    kit = [name for name, given in (("--fault", bool(faults)), ("--fault-matrix", fault_matrix),
                                    ("--config-matrix", config_matrix is not None)) if given]
    if kit and backend != "xentools":
        problem = f"{kit[0]} needs --backend xentools (our blkback is the one that misbehaves or is configured)"
    elif config_matrix is not None and len(kit) > 1:
        problem = f"--config-matrix boots an honest backend: drop {' and '.join(k for k in kit if k != '--config-matrix')}"
    else:
        try:
            parse_faults(faults)
            if config_matrix is not None:
                configs = config_rows(config_matrix or None)
        except (FaultSpecError, BootTestError) as err:
            problem = str(err)
    if problem is not None:
        click.echo(f"xentools: error: {problem}", err=True)
        ctx.exit(2)
    return tuple(spec.strip() for spec in faults), configs


def _run_matrix(matrix: str, boot: Callable[..., BootResult], out: Path, dom: str, read_only: bool,
                idle_timeout: float, configs: list[ConfigRow], specs: tuple[str, ...]) -> list[MatrixRow]:
    """One boot per row, one after the other, each in out/<NN>-<row>/ as domain <dom>-<NN>;
    a row's progress line goes to stderr. Fault rows: `specs`, else one per kind; a
    keep-mapped row's backend offers no persistent grants (its fault needs per-request
    mappings)."""
    rows: list[MatrixRow] = []
    if matrix == "fault-matrix":
        delay = min(MATRIX_LATE_DELAY, idle_timeout / 2) if idle_timeout else MATRIX_LATE_DELAY
        specs = specs or tuple(matrix_faults(KINDS, late_delay=delay))
        for index, spec in enumerate(specs, 1):
            kind = spec.partition(":")[0]
            options = ("--no-persistent",) if kind in GRANT_KINDS else ()
            result = boot(out / f"{index:02d}-{kind}", f"{dom}-{index:02d}", options=options, with_faults=(spec,))
            assert result.fault is not None
            rows.append(fault_row(result.fault, result))
            _notice(f"fault {index}/{len(specs)} {spec}: {rows[-1].verdict}, reaction {rows[-1].columns['reaction']}")
        return rows
    for index, row in enumerate(configs, 1):
        result = boot(out / f"{index:02d}-{row.name}", f"{dom}-{index:02d}",
                      ro=read_only or bool(row.values["read_only"]), options=tuple(row.blkback_options()))
        rows.append(config_row(row, result))
        _notice(f"configuration {index}/{len(configs)} {row.name}: {rows[-1].verdict}")
    return rows
