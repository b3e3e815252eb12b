"""Benchmark on real Xen, run in dom0, with the frontends where users have them: in a guest.

Owns: one PV guest (dom0's Debian kernel; the domU initramfs of tests/xen/domu.py, which
carries this repository's Python, plus xen-blkfront and /bin/guest-load, tests/xen/guest_load.c
built static) that reads four disks, each its own copy of one RAW image (the same bytes):
  A. xvdb: the guest's xen-blkfront on Linux's xen-blkback (a loop device, guests.KernelVbd);
  B. our blkfront in the guest (domu_guest.py's "bench" task) on Linux's xen-blkback, its
     frontend directory under xentools-frontend/vbd/, where the guest's xen-blkfront does
     not look;
  C. xvdc: the guest's xen-blkfront on our blkback (`python -m xentools blkback serve`);
  D. xvdd: the guest's xen-blkfront on QEMU's qdisk (Debian's qemu-system-xen attached to
     the guest, `-M xenpv`, as libxl runs it for a PV guest's backendtype=qdisk disks);
measured in rounds by the guest (each round every setup's 1 MiB sequential reads at depth 1,
then every setup's 4 KiB random reads at depth 32; the order B, A, C, D, so that the two
setups of every ratio are measured one after the other, reversed every other round), and the
ratios B/A (targets: seq >= 1.0, rand >= 0.8), C/A (>= 0.9) and C/D (>= 1.0) of each round,
their medians and verdicts (xentools.tools.bench_verdict), printed as ONE JSON line (also
$NESTED_RESULTS/bench-guest.json), each verdict also one line on stderr. The kernel frontend
reads with guest-load (what fio does in bench_blk.py: psync 1 MiB, libaio 4 KiB), ours with
bench_front as in bench_blk.py (1 MiB into the batch API's granted pages, judged, and through
readinto, copied into the caller's buffer, reported beside it; read_many).
Where it runs: with two physical CPUs under Xen (tests/nested/run.py --smp 2), dom0's vCPUs
are pinned to CPU 0 and the guest's to CPU 1 (`xl vcpu-pin`; dom0's put back after), so the
backends have dom0's CPU and the frontends the guest's, as on a host; with one, they share it.
Why beside bench_blk.py: there every frontend is dom0's own, so each of our blkback's
wake-ups also switches dom0's vCPU between the frontend's process and ours (a pipe round trip
between two processes costs 244 us in the nested dom0, between two threads 180 us, a system
call 17 us); here the frontends are the guest's, as in the boot-test.
Reported, never asserted: only a wrong answer fails (a disk whose first MiB differs from its
image, a read of ours that differs from it, a guest-load that fails, a guest that does not
finish), with a non-zero exit.
Must not: run under pytest by itself (tests/xen/test_guest_bench.py calls run()), or leave
the guest, a vbd, a loop device or a backend process behind (Guest.destroy and its cleanups).

Usage in dom0:  python tests/xen/bench_guest.py [--seconds S] [--rounds R] [--size-mib N]
From the host:  make bench-xen-guest  (builds build/guest-load, boots with two CPUs)
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_blk import (  # noqa: E402
    FIGURES,
    READINTO,
    QemuDom0Backend,
    judged,
    medians,
    publish,
    qdisk_vbd,
    ring_loop_counts,
    ring_profile,
)
from bench_front import RAND_DEPTH, BenchError  # noqa: E402
from blk_helpers import INIT_WAIT, MiB, OurBlkback, our_vbd  # noqa: E402
from domu import domu_config, domu_initramfs  # noqa: E402
from domu_guest import BENCH_FRONTEND_DIR  # noqa: E402
from guests import RERUNS, Guest, GuestError, guest_kernel, guest_lines, record_rerun, unique_name  # noqa: E402

from xentools.core.errors import XentoolsError  # noqa: E402
from xentools.core.vbd import encode_vbd  # noqa: E402
from xentools.devices.blkback_ringloop import compiled  # noqa: E402
from xentools.devices.toolstack import destroy_vbd  # noqa: E402
from xentools.tools.images.xl import check_xl  # noqa: E402
from xentools.platform.xen.platform import XenPlatform  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LOAD = REPO / "build" / "guest-load"  # make bench-xen-guest builds it from tests/xen/guest_load.c
# Setup -> what the guest calls it: our frontend "ours", the kernel frontend's disks by name;
# in measuring order (B, A, C, D).
SETUPS = {"ours_front": "ours", "kernel_back": "xvdb", "ours_back": "xvdc", "qdisk": "xvdd"}
OURS_FRONT_DEVID = encode_vbd("xvde")  # B's vbd number, under xentools-frontend/vbd/ in the guest
SEED = 5  # the images' bytes: random.Random(SEED).randbytes(size), as the guest computes them
GUEST_MEMORY = 384  # MiB: the initramfs (~50 MB, in RAM), Python, and the image's bytes to check against
TARGETS = {
    "ours_front_vs_kernel_front_seq_1m": 1.0,
    "ours_front_vs_kernel_front_rand_4k_qd32": 0.8,
    "ours_back_vs_kernel_back_seq_1m": 0.9,
    "ours_back_vs_kernel_back_rand_4k_qd32": 0.9,
    "ours_back_vs_qdisk_seq_1m": 1.0,
    "ours_back_vs_qdisk_rand_4k_qd32": 1.0,
}
RATIOS = {"ours_front_vs_kernel_front": ("ours_front", "kernel_back"),
          "ours_back_vs_kernel_back": ("ours_back", "kernel_back"),
          "ours_back_vs_qdisk": ("ours_back", "qdisk"),
          "qdisk_vs_kernel_back": ("qdisk", "kernel_back")}
_LOAD_LINE = re.compile(r"load (\d+) (\w+) (seq|readinto|rand) ([0-9.]+)$")
# A load line's kind -> the figure's key (readinto: our frontend's only, bench_blk.READINTO).
_KEYS = {**{kind: key for kind, (_, key) in FIGURES.items()}, "readinto": READINTO[1]}


def fnv1a64(data: bytes) -> str:
    """guest-load's sum: FNV-1a 64 of `data`, 16 hex digits."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def xl(*argv: str) -> str:
    """`xl ARGV`'s output (the tools layer's check_xl: a crashed xl repeated and recorded as a
    re-run, a failure raised as a XentoolsError with xl's last line)."""
    return check_xl(argv, timeout=60, on_rerun=record_rerun).stdout


def physical_cpus() -> int:
    """Xen's physical CPUs (`xl info` nr_cpus)."""
    found = re.search(r"^nr_cpus\s*:\s*(\d+)", xl("info"), re.M)
    if not found:
        raise BenchError("xl info printed no nr_cpus")
    return int(found.group(1))


def parse(lines: list[str], rounds: int) -> list[dict[str, dict[str, float]]]:
    """Each round's figures {setup: {"seq_1m_mbps"|"rand_4k_qd32_iops": value}} from the
    guest's "load" lines; BenchError when one is missing."""
    by_name = {name: setup for setup, name in SETUPS.items()}
    per_round: list[dict[str, dict[str, float]]] = [{setup: {} for setup in SETUPS} for _ in range(rounds)]
    for line in lines:
        found = _LOAD_LINE.match(line)
        if found and int(found.group(1)) < rounds and found.group(2) in by_name:
            per_round[int(found.group(1))][by_name[found.group(2)]][_KEYS[found.group(3)]] = float(found.group(4))
    for number, one in enumerate(per_round):
        for setup, figures in one.items():
            if len(figures) != len(FIGURES) + (setup == "ours_front"):
                raise BenchError(f"round {number}: the guest printed no figure for {setup} ({SETUPS[setup]})")
    return per_round


def run(seconds: float, rounds: int, size_mib: int, workdir: Path) -> dict:
    """Boot the guest with its four disks (images in `workdir`), let it measure `rounds`
    rounds of `seconds` per figure, and return the result: per setup the medians, the ratios
    and verdicts, every round's figures, our blkback's report and profile. The images and
    the initramfs are removed after, whatever happened (dom0's files are in RAM)."""
    if not LOAD.is_file():
        raise BenchError(f"no {LOAD}: run `make bench-xen-guest` (it builds it from tests/xen/guest_load.c "
                         "with gcc -static)")
    images = {setup: workdir / f"guest-{setup}.raw" for setup in SETUPS}
    initramfs = workdir / "initramfs.cpio"
    try:
        return _run(seconds, rounds, size_mib, workdir, images, initramfs)
    finally:
        for path in (*images.values(), initramfs):  # dom0's files live in RAM (tests/nested/dom0/init)
            path.unlink(missing_ok=True)


def _run(seconds: float, rounds: int, size_mib: int, workdir: Path, images: dict[str, Path], initramfs: Path) -> dict:
    size = size_mib * MiB
    data = random.Random(SEED).randbytes(size)
    want = fnv1a64(data[:MiB])
    for image in images.values():
        image.write_bytes(data)
    del data
    kernel = guest_kernel()
    domu_initramfs(initramfs, kernel, modules=("xen-blkfront", "xen-gntalloc", "xen-evtchn"),
                   extra_files={"bin/guest-load": LOAD.read_bytes()}, executables=("bin/guest-load",))
    disks = [name for setup, name in SETUPS.items() if setup != "ours_front"]
    cfg = domu_config(unique_name("xt-bench"), kernel, initramfs, memory=GUEST_MEMORY, task="bench",
                      load="xen-blkfront+xen-gntalloc+xen-evtchn", disks="+".join(disks), ours=OURS_FRONT_DEVID,
                      rounds=rounds, seconds=seconds, size_mib=size_mib, seed=SEED)
    cpus = physical_cpus()
    timings: dict[str, float] = {}
    xs = XenPlatform().open_xenstore(timeout=30.0)
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            guest = stack.enter_context(Guest(cfg, workdir))
            domid = guest.domid
            assert domid is not None
            guest.attach_kernel_vbd(xs, images["kernel_back"], devid=encode_vbd(SETUPS["kernel_back"]))
            guest.attach_kernel_vbd(xs, images["ours_front"], devid=OURS_FRONT_DEVID,
                                    frontend_dir=f"/local/domain/{domid}/{BENCH_FRONTEND_DIR}/{OURS_FRONT_DEVID}")

            # Each backend goes when the guest does (Guest.destroy's cleanups): its vbd
            # removed first (ours then exits by itself, writing its report), then the process.
            paths = our_vbd(xs, images["ours_back"], frontend_domid=domid, devid=encode_vbd(SETUPS["ours_back"]))
            backend = OurBlkback(paths.backend, images["ours_back"], workdir, "--verbose")

            def release_ours() -> None:
                destroy_vbd(xs, paths)
                with contextlib.suppress(AssertionError):
                    backend.wait_exit()
                backend.stop()

            guest.after_destroy(release_ours)
            backend.__enter__()
            backend.wait_state(xs, {INIT_WAIT})

            qemu = QemuDom0Backend(workdir / "qemu-qdisk.log", domid)
            qpaths = qdisk_vbd(xs, images["qdisk"], encode_vbd(SETUPS["qdisk"]), frontend_domid=domid)

            def release_qdisk() -> None:
                destroy_vbd(xs, qpaths)
                qemu.__exit__(None, None, None)

            guest.after_destroy(release_qdisk)
            qemu.__enter__()

            if cpus >= 2:
                xl("vcpu-pin", "0", "all", "0")
                stack.callback(subprocess.run, ["xl", "vcpu-pin", "0", "all", "all"], capture_output=True, timeout=60)
                xl("vcpu-pin", str(domid), "all", "1")
                placed = "dom0's vCPUs on CPU 0, the guest's on CPU 1 (xl vcpu-pin)"
            else:
                placed = "one CPU: dom0 and the guest share it"
            guest.unpause()
            measuring = 2 * len(SETUPS) * rounds * (seconds + 4)
            guest.wait_for("GUEST: python exited", timeout=300 + measuring)
            timings["guest_s"] = round(time.monotonic() - started, 1)
            qemu.check_alive()
            lines = guest_lines(guest.console())
            failed = [line for line in lines if line.startswith("FAIL")]
            if failed or "python exited 0" not in lines:
                raise BenchError(f"the guest said: {failed[0] if failed else [x for x in lines if 'exited' in x]}")
            for disk in disks:
                if f"sum {disk} {want}" not in lines:
                    raise BenchError(f"{disk}: the guest read a first MiB that differs from the image (want FNV-1a "
                                     f"{want}; the guest's lines: {[x for x in lines if x.startswith('sum')]})")
            per_round = parse(lines, rounds)
            guest.destroy()
            backend.exited_cleanly()
            report = backend.report()
            served = ring_loop_counts(backend.stderr())
            profile = ring_profile(backend.stderr())
            profile["compiled_wait"] = backend.compiled_wait()
    finally:
        xs.close()
    timings["total_s"] = round(time.monotonic() - started, 1)

    return {
        **medians(per_round, SETUPS),
        **judged(per_round, RATIOS, TARGETS, readinto="ours_front_vs_kernel_front"),
        "rounds": per_round,
        "targets": TARGETS,
        "our_blkback_violations": report.get("total"),
        "our_blkback_requests": {"served": served[0], "by_compiled_loop": served[1],
                                 "ring_loop": "compiled" if compiled() is not None else "pure Python", **profile},
        "reruns": list(RERUNS),
        "config": {
            "guest": f"PV, 1 vCPU, {cfg.memory_mb} MiB, Linux {kernel.version}",
            "setups": {
                "ours_front": "our blkfront in the guest (BlkFront, bench_front) on xen-blkback",
                "kernel_back": f"the guest's xen-blkfront ({SETUPS['kernel_back']}) on xen-blkback",
                "ours_back": f"the guest's xen-blkfront ({SETUPS['ours_back']}) on our blkback",
                "qdisk": f"the guest's xen-blkfront ({SETUPS['qdisk']}) on QEMU's qdisk",
            },
            "seq": "1 MiB O_DIRECT reads at depth 1 (guest-load seq: pread; ours: BatchIO, one lane of 1 MiB, used "
                   "in its granted pages; seq_1m_readinto: BlkFront.readinto, copied into the caller's buffer)",
            "rand": f"4 KiB O_DIRECT random reads at depth {RAND_DEPTH} (guest-load rand: io_submit; "
                    "BatchIO.read_many)",
            "order": "each round: " + ", ".join(SETUPS) + " (sequential, then random); reversed every other round",
            "image_mib": size_mib,
            "seconds_per_measurement": seconds,
            "rounds": rounds,
            "placement": placed,
            "physical_cpus": cpus,
            "figures": "per setup, the median over the rounds; ratios: the median of each round's ratios",
            "mbps_unit": "10^6 bytes per second",
        },
        "timings": timings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement (default 3)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of measurements (default 9)")
    parser.add_argument("--size-mib", type=int, default=64, help="image size in MiB (default 64)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.size_mib < 1:
        print("bench_guest: error: --seconds must be positive, --rounds and --size-mib at least 1", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-guest-"))
    try:
        result = run(args.seconds, args.rounds, args.size_mib, workdir)
    except (BenchError, GuestError, XentoolsError, AssertionError, OSError, subprocess.SubprocessError) as err:
        print(f"bench_guest: error: {err}", file=sys.stderr)  # e.g. not in dom0: PlatformError says so
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    publish(result, "bench_guest", "bench-guest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
