"""DOMU SIDE: the Python program a PV test domU runs (from its initramfs: tests/xen/domu.py), and the
workload it shares with the dom0 side that checks it (tests/xen/test_domu.py).

Owns:
- `plan_writes`: the writes of the domU workload, a pure function of (seed, size), so dom0
  knows, without trusting the domU, what the image file must hold afterwards;
- `initial_content`: the image's bytes before the workload (blk_helpers.Disk writes the same
  bytes for the same seed: random.Random(seed).randbytes(size));
- the "blkfront" task: our BlkFront in this domU, on the real platform (gntalloc, evtchn,
  /dev/xen/xenbus), attaching each vbd named on the command line in turn, running the
  verified workload (direct and indirect reads and writes, reads checked against the model,
  flush), closing it, and then handing over to dom0: it prints the grant refs and event
  channel ports it used and waits until dom0 has checked, from Xen's own tables, that the
  backend let go of them (the xenstore node data/xentools-ack carries dom0's answer);
- the "bench" task (tests/xen/bench_guest.py): the guest's side of the guest benchmark. Our
  BlkFront on the vbd `ours` (a frontend directory under xentools-frontend/vbd/, where the
  guest's own xen-blkfront, loaded for the other disks, does not look) is measured by
  bench_front, the kernel frontend's `disks` by /bin/guest-load (tests/xen/guest_load.c), in
  rounds: each round every setup's 1 MiB sequential reads, then every setup's 4 KiB random
  reads, in the order ours, then `disks`, reversed every other round;
- the "bad-input" task: `xentools doctor` and `xentools blk info` in a domU without gntalloc,
  on a vbd it has no permission on, and without /dev/xen/xenbus; each one's exit status,
  stdout and stderr printed for dom0 to judge (task_bad_input).
Must not: decide the verdict (dom0 compares the image file with the model and reads Xen's
grant and event channel tables), or import pytest (Python here is ~18x slower than on the
host: keep the imports and the workload small).

Parameters come from the kernel command line (xentools.KEY=VALUE, tests/xen/guests.py
guest_extra): task, vbds (devids joined by "+"), seed (the i-th vbd's image has seed + i);
good, denied (task_bad_input); disks (names joined by "+"), ours (our frontend's devid), rounds,
seconds, size_mib, seed (every disk's image is random.Random(seed).randbytes) (task_bench).
Output lines start with "GUEST: " (guests.guest_lines reads them):
  GUEST: attached DEVID {info json}
  GUEST: workload DEVID {stats json}
  GUEST: released DEVID {"refs": [...], "ports": [...], "close_report": {...}, "gntalloc_maps": N}
  GUEST: checked DEVID                  dom0 answered; the next vbd follows
  GUEST: cli LABEL rc=RC stdout=JSON stderr=JSON   (task bad-input)
  GUEST: sum DISK HEX                  (task bench) FNV-1a 64 of a kernel disk's first MiB
  GUEST: load ROUND SETUP seq|readinto|rand VALUE   (task bench) MB/s or IOPS; SETUP "ours"
                                       or a disk (readinto: ours only)
  GUEST: note read at ...               a read that differed from the model: how (diagnose)
  GUEST: FAIL reason
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path

import bench_front

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512
ACK_NODE = "data/xentools-ack"  # relative: /local/domain/<this domU>/data, writable by both
ACK_TIMEOUT = 120.0
# The disk of the workload: large enough for a 1 MiB (256-segment) request and a few more.
DISK_SIZE = 4 * MiB
# The frontend this domU asks for; each backend's offer cuts it down.
FRONT_CONFIG = {"ring_page_order": 4, "num_queues": 2, "max_indirect_segments": 256, "persistent": True}


def say(text: str) -> None:
    print(f"GUEST: {text}", flush=True)


def initial_content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def plan_writes(seed: int, size: int) -> list[tuple[int, bytes]]:
    """(offset, data) written in this order: 256 KiB at an odd sector (65 segments, indirect
    where negotiated), 4 KiB (one segment, direct), 512 bytes at an odd sector, and eight
    4 KiB pages submitted together (spread over the queues)."""
    rng = random.Random(seed * 7919 + 1)
    writes = [
        (1 * MiB + 3 * SECTOR, rng.randbytes(256 * KiB)),
        (2 * MiB, rng.randbytes(4 * KiB)),
        (9 * SECTOR, rng.randbytes(SECTOR)),
    ]
    pages = rng.sample(range(3 * MiB // 4096, size // 4096), 8)
    writes += [(page * 4096, rng.randbytes(4096)) for page in pages]
    return writes


def cmdline() -> dict[str, str]:
    words = Path("/proc/cmdline").read_text().split()
    return {w.split("=", 1)[0][len("xentools."):]: w.split("=", 1)[1]
            for w in words if w.startswith("xentools.") and "=" in w}


def recording_platform():  # type: ignore[no-untyped-def]
    """XenPlatform whose handles remember every grant ref shared and port bound, and how
    many pages were still shared when a sharer was closed (the frontend must unshare all)."""
    from xentools.platform.xen.platform import XenEventChannels, XenGrantSharer, XenPlatform

    class Sharer(XenGrantSharer):
        def __init__(self, log: dict) -> None:
            super().__init__()
            self.log = log

        def share(self, domid, count, writable=True):  # type: ignore[no-untyped-def]
            pages = super().share(domid, count, writable)
            self.log["refs"].extend(pages.refs)
            return pages

        def close(self) -> None:
            self.log["left_at_close"].append(len(self.shared))
            super().close()

    class Channels(XenEventChannels):
        def __init__(self, log: dict) -> None:
            super().__init__()
            self.log = log

        def bind_unbound(self, remote_domid: int) -> int:
            port = super().bind_unbound(remote_domid)
            self.log["ports"].append(port)
            return port

    class Recording(XenPlatform):
        def __init__(self) -> None:
            super().__init__()
            self.log: dict[str, list[int]] = {"refs": [], "ports": [], "left_at_close": []}

        def open_gntshr(self) -> Sharer:
            return Sharer(self.log)

        def open_evtchn(self) -> Channels:
            return Channels(self.log)

    return Recording()


def workload(dev, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Reads checked against the model (a 1 MiB request: indirect when negotiated; 44 KiB:
    11 segments, the largest direct request; a 4 KiB and a 512-byte one), plan_writes with
    every write read back, then a flush (durable on the backend before dom0 looks)."""
    size = dev.sectors * dev.sector_size
    if size != DISK_SIZE:
        raise AssertionError(f"disk has {size} bytes, the workload expects {DISK_SIZE}")
    model = bytearray(initial_content(seed, size))
    for offset, length in ((0, MiB), (3 * MiB + 8 * KiB, 44 * KiB), (5 * 4096, 4096), (7 * SECTOR, SECTOR)):
        got = dev.read(offset // SECTOR, length // SECTOR)
        if got != model[offset : offset + length]:
            diagnose(dev, model, offset, got, seed)
            raise AssertionError(f"read of {length} bytes at {offset} differs from the image")
    writes = plan_writes(seed, size)
    for offset, data in writes[:3]:
        dev.write(offset // SECTOR, data)
    with dev.batch():
        futures = [dev.submit_write(offset // SECTOR, data) for offset, data in writes[3:]]
    for fut in futures:
        fut.result(60)
    for offset, data in writes:
        model[offset : offset + len(data)] = data
        if dev.read(offset // SECTOR, len(data) // SECTOR) != data:
            raise AssertionError(f"read back of {len(data)} bytes at {offset} differs from what was written")
    dev.flush()


def diagnose(dev, model: bytearray, offset: int, got: bytes, seed: int) -> None:  # type: ignore[no-untyped-def]
    """After a read that differed from the model: where and how (for the reader of the
    console). The same range is read again, and the model rebuilt: a second read equal to the
    first and a rebuilt model equal to the image point at this process's own memory, not at
    the transport (the 2026-11-27 case: the emulator lost vCPU register state)."""
    want = bytes(model[offset : offset + len(got)])
    runs: list[tuple[int, int]] = []
    at = None
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b and at is None:
            at = i
        elif a == b and at is not None:
            runs.append((at, i - at))
            at = None
    if at is not None:
        runs.append((at, len(got) - at))
    again = dev.read(offset // SECTOR, len(got) // SECTOR)
    rebuilt = initial_content(seed, len(model))[offset : offset + len(got)]
    say(f"note read at {offset} of {len(got)} bytes: {len(runs)} differing runs {runs[:12]}; "
        f"read again: {'same bytes' if again == got else 'other bytes'}; "
        f"model rebuilt: {'equal to the read' if rebuilt == got else 'equal to the model' if rebuilt == want else 'a third value'}")


def wait_ack(xs, devid: int) -> None:  # type: ignore[no-untyped-def]
    """Until dom0 wrote DEVID into ACK_NODE (it checked the release from its side)."""
    from xentools.platform.interface import XenstoreError

    deadline = time.monotonic() + ACK_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if xs.read(ACK_NODE).decode() == str(devid):
                return
        except XenstoreError as err:
            if err.errno_name != "ENOENT":
                raise
        time.sleep(0.2)
    raise AssertionError(f"dom0 did not acknowledge vbd {devid} in {ACK_NODE} within {ACK_TIMEOUT:.0f} s")


def gntalloc_maps() -> int:
    return sum(1 for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith("/dev/xen/gntalloc"))


def task_blkfront(params: dict[str, str]) -> None:
    from xentools.devices.blkfront import BlkFront, BlkfrontConfig

    for index, devid in enumerate(int(v) for v in params["vbds"].split("+")):
        seed = int(params["seed"]) + index  # each vbd's image has its own content
        platform = recording_platform()
        dev = BlkFront.attach(platform, devid, config=BlkfrontConfig(**FRONT_CONFIG, connect_timeout=60.0))
        try:
            say(f"attached {devid} {json.dumps(dev.info.to_dict(), sort_keys=True)}")
            workload(dev, seed)
            say(f"workload {devid} {json.dumps(dev.stats, sort_keys=True)}")
        finally:
            dev.close()
        released = {
            "refs": sorted(set(platform.log["refs"])),
            "ports": platform.log["ports"],
            "left_at_close": platform.log["left_at_close"],
            "close_report": dev.close_report,
            "gntalloc_maps": gntalloc_maps(),
        }
        say(f"released {devid} {json.dumps(released, sort_keys=True)}")
        xs = platform.open_xenstore()
        try:
            wait_ack(xs, devid)
        finally:
            xs.close()
        say(f"checked {devid}")


# The bench task: where our frontend's vbd is (relative to the domain's directory), the load
# generator in the initramfs, and how long its disks may take to appear.
BENCH_FRONTEND_DIR = "xentools-frontend/vbd"
GUEST_LOAD = "/bin/guest-load"
# Our frontend's measurements by the name the load lines give them ("readinto" right after "seq").
OURS = {"seq": bench_front.ours_seq, "readinto": bench_front.ours_seq_readinto, "rand": bench_front.ours_rand}
DISK_TIMEOUT = 120.0


def wait_for_disk(name: str) -> None:
    deadline = time.monotonic() + DISK_TIMEOUT
    size = Path(f"/sys/class/block/{name}/size")
    while not (size.is_file() and size.read_text().strip() not in ("", "0")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no /dev/{name} after {DISK_TIMEOUT:.0f} s")
        time.sleep(0.1)


def guest_load(*argv: str) -> str:
    """guest-load's one line, without its first word. Never run twice: it is our program,
    and a signal that ends it is its failure (as guest_init/python.sh treats this one)."""
    result = subprocess.run([GUEST_LOAD, *argv], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not result.stdout.strip():
        raise AssertionError(f"guest-load {' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout.split()[1]


def task_bench(params: dict[str, str]) -> None:
    from xentools.devices.blkfront import BlkFront, BlkfrontConfig
    from xentools.platform.xen.platform import XenPlatform

    disks = params["disks"].split("+")
    rounds, seconds = int(params["rounds"]), float(params["seconds"])
    size = int(params["size_mib"]) * MiB
    content = random.Random(int(params["seed"])).randbytes(size)  # what every disk holds
    for disk in disks:
        wait_for_disk(disk)
        say(f"sum {disk} {guest_load('sum', f'/dev/{disk}')}")
    platform = XenPlatform()
    path = f"/local/domain/{platform.domid}/{BENCH_FRONTEND_DIR}/{int(params['ours'])}"
    config = BlkfrontConfig(**bench_front.frontend_config(os.cpu_count() or 1), connect_timeout=60.0)
    dev = BlkFront.attach(platform, path, config=config)
    try:
        order = ["ours", *disks]
        for number in range(rounds):
            for kind in ("seq", "rand"):
                for setup in order if number % 2 == 0 else order[::-1]:
                    if setup == "ours":
                        kinds = ("seq", "readinto") if kind == "seq" else ("rand",)
                        for measured in kinds:
                            value = OURS[measured](dev, size, seconds, lambda o, n: content[o : o + n])
                            say(f"load {number} {setup} {measured} {value:.1f}")
                    else:
                        value = guest_load(kind, f"/dev/{setup}", str(seconds), str(bench_front.RAND_DEPTH))
                        say(f"load {number} {setup} {kind} {value}")
    finally:
        dev.close()


def cli(label: str, *argv: str) -> None:
    """`xentools ARGV` in this process, as its console script runs it (exit status and
    stderr are what a user sees; one Python start in the domU costs several seconds)."""
    import contextlib
    import io

    from xentools.tools.cli import cli as xentools

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            xentools.main(list(argv), prog_name="xentools")
            rc = 0
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else 1
    say(f"cli {label} rc={rc} stdout={json.dumps(out.getvalue())} stderr={json.dumps(err.getvalue())}")


def task_bad_input(params: dict[str, str]) -> None:
    """The domU booted without gntalloc (xentools.load=xen-evtchn). vbd `good` has a backend
    in InitWait; vbd `denied`'s frontend directory is dom0's alone. In order:
    no-gntalloc-*: doctor, and blk info on `good`; then gntalloc loaded, denied-*: blk info
    on `denied`, and doctor; then /dev/xen/xenbus removed, no-xenbus-*: doctor, blk info."""
    good, denied = params["good"], params["denied"]
    cli("no-gntalloc-doctor", "doctor")
    cli("no-gntalloc-blk", "blk", "info", "--vbd", good, "--timeout", "60")
    subprocess.run(["insmod", "/lib/modules/xen-gntalloc.ko"], check=True, timeout=120)  # busybox
    cli("denied-blk", "blk", "info", "--vbd", denied, "--timeout", "60")
    cli("denied-doctor", "doctor")
    Path("/dev/xen/xenbus").unlink()
    cli("no-xenbus-doctor", "doctor")
    cli("no-xenbus-blk", "blk", "info", "--vbd", good, "--timeout", "60")


def main() -> int:
    begun = os.environ.get("XT_BEGUN")
    if begun:  # guest_init/python.sh: from here on, a crash is ours (never run again)
        Path(begun).touch()
    params = cmdline()
    started = time.monotonic()
    try:
        task = params.get("task")
        if task == "blkfront":
            task_blkfront(params)
        elif task == "bad-input":
            task_bad_input(params)
        elif task == "bench":
            task_bench(params)
        else:
            say(f"FAIL unknown xentools.task={task!r}")
            return 2
    except Exception as err:  # noqa: BLE001 - the console is the only way out of the domU
        traceback.print_exc()
        say(f"FAIL {type(err).__name__}: {err}")
        return 1
    say(f"python done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
