"""Shared pieces of the real-Xen block tests (tests/xen/test_blk_*.py) and the benchmark
(tests/xen/bench_blk.py), all run in dom0.

Owns:
- `CheckedPlatform`: the real XenPlatform whose grant sharers remember how many pages were
  still shared when the frontend closed them (XenGrantSharer.close would silently unshare
  them, hiding a leak), and `frontend_released`, the checks that a closed BlkFront left no
  grant behind;
- `OurBlkback`: our userspace blkback (`python -m xentools blkback serve`) in its own
  process, with its conformance report, its exit, and the grant mappings it holds as the
  kernel sees them (/dev/xen/gntdev lines of /proc/PID/maps; `GrantMapSampler` samples them
  while a guest runs);
- `our_vbd`: a vbd for our blkback, its backend directory under backend/xtvbd/
  (toolstack.USERSPACE_BACKEND_KIND): dom0's xen-blkback claims every node under
  backend/vbd/ and would bind the frontend's event channel before our process could;
- the kernel frontend in dom0 (`kernel_blkfront`, `KernelFrontVbd`, `kernel_disk`,
  `close_vbd`: the toolstack's graceful removal, online=0 and state=Closing, before the
  directories go). Our own frontend's directory goes outside device/vbd/
  (`self_frontend_dir`), since dom0's xen-blkfront, once loaded, claims every node there;
- `Disk`: an image file with a model of what it must hold, and `exercise`, the verified
  workload (direct and indirect reads and writes, concurrency over every queue, flush,
  discard) any of our frontends runs, checked against the image file read by dom0 itself;
- fixtures for the test files, imported there: `xs` (xs_fixture), `checked_platform`,
  `no_vbd_left`.
Must not: start Xen services, build guests (tests/xen/guests.py does), or decide verdicts
beyond the helpers' own preconditions (each raises AssertionError with what it saw).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # bench_blk.py runs as a script, not under pytest

from guests import SELF_FRONTEND_ROOT, KernelVbd  # noqa: E402

from xentools.core.vbd import decode_vbd  # noqa: E402
from xentools.devices.blkfront import BlkFront  # noqa: E402
from xentools.devices.toolstack import USERSPACE_BACKEND_KIND, VbdPaths, create_vbd  # noqa: E402
from xentools.platform.interface import XenstoreError  # noqa: E402
from xentools.platform.xen.platform import XenGrantSharer, XenPlatform  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512
DOM0 = 0
REPO = HERE.parent.parent
XEN_BACKEND_BUS = Path("/sys/bus/xen-backend/devices")
# XenbusState numbers (xen/io/xenbus.h).
INIT_WAIT, CONNECTED, CLOSING, CLOSED = 2, 4, 5, 6


def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.05):  # type: ignore[no-untyped-def]
    """predicate()'s first truthy value, polled until `timeout` s; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


def read_key(xs, path: str) -> str | None:  # type: ignore[no-untyped-def]
    """A xenstore node's value as text, None when absent."""
    try:
        return xs.read(path).decode()
    except XenstoreError as err:
        if err.errno_name == "ENOENT":
            return None
        raise


def grant_maps(pid: int | str, device: str) -> int:
    """How many mappings of /dev/xen/<device> (gntdev: grants mapped; gntalloc: pages
    shared) process `pid` holds now, as its kernel memory map shows them."""
    text = Path(f"/proc/{pid}/maps").read_text()
    return sum(1 for line in text.splitlines() if line.endswith(f"/dev/xen/{device}"))


def dmesg(grep: str) -> list[str]:
    """Kernel log lines containing `grep`."""
    out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30, check=True).stdout
    return [line for line in out.splitlines() if grep in line]


# ------------------------------------------------------------------------ our frontend

class CheckedSharer(XenGrantSharer):
    """A gntshr handle that records, when closed, how many pages were still shared: a
    frontend that unshared everything itself leaves 0 (close() would unshare the rest
    without a word)."""

    def __init__(self) -> None:
        super().__init__()
        self.left_at_close: int | None = None

    def close(self) -> None:
        if self.left_at_close is None:
            self.left_at_close = len(self.shared)
        super().close()


class CheckedPlatform(XenPlatform):
    """XenPlatform whose open_gntshr hands out CheckedSharer, all kept in `sharers`."""

    def __init__(self) -> None:
        super().__init__()
        self.sharers: list[CheckedSharer] = []

    def open_gntshr(self) -> CheckedSharer:
        sharer = CheckedSharer()
        self.sharers.append(sharer)
        return sharer


def frontend_released(dev: BlkFront, platform: CheckedPlatform) -> None:
    """After dev.close(): the backend reached Closed before we unshared, nothing was leaked
    or still mapped, every sharer had unshared all its pages before it was closed, and this
    process maps no gntalloc page any more."""
    report = dev.close_report
    assert report.get("backend_closed") is True, f"backend never reached Closed: {report}"
    assert report.get("leaked_pages") == 0 and report.get("still_mapped") == 0, report
    assert platform.sharers, "the frontend shared nothing: nothing was checked"
    for sharer in platform.sharers:
        assert sharer.left_at_close == 0, f"{sharer.left_at_close} page sets still shared when closed"
        assert not sharer.shared
    assert grant_maps("self", "gntalloc") == 0, "this process still maps gntalloc pages"


def self_frontend_dir(devid: int) -> str:
    """A dom0 frontend directory for a userspace frontend, where no kernel driver looks."""
    return f"{SELF_FRONTEND_ROOT}/{devid}"


# ------------------------------------------------------------------------ image and model

class Disk:
    """A RAW image file of random bytes and `model`, what it must hold: tests apply every
    write and discard to the model and compare the file (read by dom0 itself, not through
    any frontend) with it."""

    def __init__(self, path: Path, size: int, seed: int) -> None:
        self.path = Path(path)
        self.size = size
        self.model = bytearray(random.Random(seed).randbytes(size))
        self.path.write_bytes(self.model)

    def file_bytes(self, offset: int = 0, length: int | None = None) -> bytes:
        length = self.size - offset if length is None else length
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    def assert_file_matches(self) -> None:
        data = self.file_bytes()
        if data != self.model:
            first = next(i for i in range(self.size) if data[i] != self.model[i])
            raise AssertionError(f"{self.path} differs from the expected content first at byte {first}")

    def sha256(self, offset: int, length: int) -> str:
        return hashlib.sha256(self.file_bytes(offset, length)).hexdigest()


def exercise(dev: BlkFront, disk: Disk, seed: int) -> dict[str, int]:
    """The verified workload; returns the frontend's stats. Every read is compared with the
    model, and the image file with the model after the flush and after the discard.

    - whole-disk read in 1 MiB requests, all in flight together (indirect, over every queue);
    - a 44 KiB read (11 segments: the largest direct request), 4 KiB reads, a 512-byte read
      at an odd sector (part of a page); with persistent grants, 600 4 KiB reads by the batch
      API's read_many on the last queue;
    - a 1 MiB write, a 48 KiB write at a sector that is not page aligned (12 segments:
      indirect when negotiated), 64 concurrent 4 KiB writes, a 512-byte write; all read back;
    - flush; the image file equals the model;
    - discard of 64 KiB (when offered): the frontend and the file read zeros there.
    """
    info = dev.info
    assert info is not None and info.sector_size == SECTOR and info.sectors * SECTOR == disk.size
    rng = random.Random(seed)
    model = disk.model

    def check_read(offset: int, length: int, what: str) -> None:
        got = dev.read(offset // SECTOR, length // SECTOR)
        assert got == model[offset : offset + length], f"{what}: read {length} bytes at {offset} differ"

    # Whole disk, 1 MiB requests all submitted before the first is awaited.
    with dev.batch():
        futures = [(off, dev.submit_read(off // SECTOR, MiB // SECTOR)) for off in range(0, disk.size, MiB)]
    for off, fut in futures:
        assert fut.result(60) == model[off : off + MiB], f"1 MiB read at {off} differs"
    check_read(3 * MiB + 8 * KiB, 44 * KiB, "44 KiB read")
    for _ in range(4):
        check_read(rng.randrange(disk.size // 4096) * 4096, 4096, "4 KiB read")
    check_read(7 * SECTOR, SECTOR, "512-byte read")
    if info.persistent:  # batch I/O's lanes are persistent grants
        # read_many: 4 KiB reads at random pages, 32 in flight, each into its place in one buffer
        # (on real Xen its loop is Python's: the compiled stream needs the software Xen's words).
        io = dev.batch_io(depth=32, request_bytes=4096, queue=info.num_queues - 1)
        try:
            sectors = [rng.randrange(disk.size // 4096) * 8 for _ in range(600)]
            into = bytearray(len(sectors) * 4096)
            io.read_many(sectors, into)
        finally:
            io.close()
        for k, sector in enumerate(sectors):
            offset = sector * SECTOR
            assert into[k * 4096 : (k + 1) * 4096] == model[offset : offset + 4096], f"read_many's read {k} differs"

    writes: list[tuple[int, bytes]] = [
        (2 * MiB, rng.randbytes(MiB)),
        (5 * MiB + 3 * SECTOR, rng.randbytes(48 * KiB)),
        (9 * SECTOR, rng.randbytes(SECTOR)),
    ]
    for offset, data in writes:
        dev.write(offset // SECTOR, data)
        model[offset : offset + len(data)] = data
    pages = rng.sample(range(disk.size // 4096), 64)
    small = [(page * 4096, rng.randbytes(4096)) for page in pages]
    with dev.batch():
        futures = [dev.submit_write(off // SECTOR, data) for off, data in small]
    for fut in futures:
        fut.result(60)
    for offset, data in small:
        model[offset : offset + len(data)] = data
    for offset, data in writes + small[:8]:
        check_read(offset, len(data), "read back")
    dev.flush()
    disk.assert_file_matches()

    if info.discard:
        offset, length = 6 * MiB, 64 * KiB
        dev.discard(offset // SECTOR, length // SECTOR)
        model[offset : offset + length] = bytes(length)
        check_read(offset, length, "read after discard")
        disk.assert_file_matches()
    return dict(dev.stats)


# ---------------------------------------------------------------------------- our blkback

class OurBlkback:
    """`python -m xentools blkback serve` serving `image` at `backend_path`, in its own
    process; stdout (the report it prints at exit) and stderr go to files in `workdir`.
    Always stopped on exit from the with-block (SIGTERM, then SIGKILL)."""

    def __init__(self, backend_path: str, image: Path, workdir: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.backend_path = backend_path
        self.env = {**os.environ, **env} if env else None  # added to this process's environment
        self.report_path = Path(workdir) / f"blkback-report-{os.getpid()}-{time.monotonic_ns()}.json"
        self.stdout_path = self.report_path.with_suffix(".out")
        self.stderr_path = self.report_path.with_suffix(".err")
        self.argv = [
            sys.executable, "-m", "xentools", "blkback", "serve", "--backend-path", backend_path,
            "--image", str(image), "--report", str(self.report_path), *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OurBlkback:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO,
                                         env=self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def compiled_wait(self) -> dict[str, int]:
        """The compiled wait loop's counters (CompiledRing.wait_profile: sleeps, events taken,
        notifies sent, serving rounds, ...) summed over the queues, from the line each queue
        logs when it stops (--verbose); {} when no queue logged one."""
        totals: dict[str, int] = {}
        for line in self.stderr().splitlines():
            _, found, rest = line.partition(": compiled wait loop: ")
            if found:
                counts = ast.literal_eval(rest.split("; reads: ", 1)[0])
                for name, value in counts.items():
                    totals[name] = totals.get(name, 0) + int(value)
        return totals

    def wait_state(self, xs, states: set[int], timeout: float = 60.0) -> int:  # type: ignore[no-untyped-def]
        """Until the backend's state is one of `states`; fails early if the process died."""
        def reached() -> int | None:
            if not self.alive():
                raise AssertionError(f"our blkback exited {self.proc.returncode}: {self.stderr()[-2000:]}")
            value = read_key(xs, f"{self.backend_path}/state")
            return int(value) if value is not None and value.isdigit() and int(value) in states else None

        return wait_until(reached, timeout, f"{self.backend_path}/state in {sorted(states)}")

    def grant_maps(self) -> int:
        """Grant mappings (gntdev) the backend process holds now."""
        return grant_maps(self.pid, "gntdev")

    def sample_grant_maps(self, every: float = 0.05) -> GrantMapSampler:
        """A context manager that samples grant_maps() in a thread; `.peak` is the largest
        count seen (a connection that never mapped anything would leave it at 0)."""
        return GrantMapSampler(self, every)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"our blkback still runs {timeout:.0f} s after it should have exited") from None

    def report(self) -> dict:
        """The conformance report it wrote at exit."""
        return json.loads(self.report_path.read_text())

    def exited_cleanly(self) -> None:
        """Exit code 0 and no warning or error logged (a failed unmap or unbind is logged
        as a warning: blkback_queue.QueueWorker._release)."""
        assert self.proc is not None and self.proc.returncode == 0, (
            f"our blkback exited {self.proc.returncode if self.proc else None}: {self.stderr()[-2000:]}"
        )
        noisy = [line for line in self.stderr().splitlines() if "WARNING" in line or "ERROR" in line]
        assert not noisy, f"our blkback logged: {noisy[:5]}"

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class GrantMapSampler:
    """Samples a backend process's grant mappings until the with-block ends."""

    def __init__(self, backend: OurBlkback, every: float) -> None:
        self.backend = backend
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grant-map-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.backend.grant_maps())
            except OSError:  # the process is gone
                return
            self._stop.wait(self.every)

    def __enter__(self) -> GrantMapSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def our_vbd(xs, image: Path, *, frontend_domid: int, devid: int, frontend_dir: str | None = None,  # type: ignore[no-untyped-def]
            mode: str = "w") -> VbdPaths:
    """Both directories of a vbd our blkback will serve, written in one transaction. The
    backend directory is under backend/xtvbd/: under backend/vbd/ dom0's xen-blkback would
    claim it (and bind the frontend's event channel before our process could)."""
    return create_vbd(
        xs, backend_domid=DOM0, frontend_domid=frontend_domid, devid=devid,
        params=str(image), mode=mode, type="file", frontend_dir=frontend_dir,
        backend_kind=USERSPACE_BACKEND_KIND,
    )


# ------------------------------------------------------------------ the kernel's frontend

def kernel_blkfront() -> bool:
    """Make sure dom0's xen-blkfront is loaded; True if this call loaded it."""
    if Path("/sys/module/xen_blkfront").exists():
        return False
    subprocess.run(["modprobe", "xen-blkfront"], check=True, capture_output=True, timeout=60)
    return True


def unload_kernel_blkfront() -> None:
    subprocess.run(["rmmod", "xen-blkfront"], check=False, capture_output=True, timeout=60)


def kernel_disk(devid: int, size: int, timeout: float = 60.0) -> Path:
    """/dev/<name> of the kernel frontend's disk for `devid`, once it has its full size."""
    name = decode_vbd(devid)
    sys_size = Path(f"/sys/class/block/{name}/size")

    def ready() -> bool:
        try:
            return int(sys_size.read_text()) * SECTOR == size and Path(f"/dev/{name}").exists()
        except (OSError, ValueError):
            return False

    wait_until(ready, timeout, f"/dev/{name} of {size} bytes")
    return Path(f"/dev/{name}")


def close_vbd(xs, paths: VbdPaths, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """The toolstack's graceful removal (libxl does the same): online=0 and state=Closing in
    the backend directory, then wait until the frontend reached Closed (or is gone). The
    directories themselves are removed by the caller (KernelVbd.detach, destroy_vbd)."""
    for _ in range(20):
        try:
            with xs.transaction() as tx:
                xs.write(f"{paths.backend}/online", "0", tx)
                xs.write(f"{paths.backend}/state", str(CLOSING), tx)
            break
        except XenstoreError as err:
            if err.errno_name != "EAGAIN":
                raise

    def closed() -> bool:
        state = read_key(xs, f"{paths.frontend}/state")
        return state is None or state == str(CLOSED)

    wait_until(closed, timeout, f"{paths.frontend} reaching Closed")


@dataclass
class KernelFrontVbd:
    """A dom0 disk of the kernel's xen-blkfront (/dev/xvdX) served by the kernel blkback
    from a loop device over `image`."""

    xs: object
    image: Path
    devid: int
    size: int
    vbd: KernelVbd | None = None
    disk: Path | None = None

    def __enter__(self) -> KernelFrontVbd:
        self.vbd = KernelVbd(self.xs, self.image, frontend_domid=DOM0, devid=self.devid)
        self.vbd.attach()
        try:
            self.disk = kernel_disk(self.devid, self.size)
        except BaseException:
            self.vbd.detach()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.vbd is not None and self.vbd.paths is not None:
            try:
                close_vbd(self.xs, self.vbd.paths)
            finally:
                self.vbd.detach()


@pytest.fixture(name="xs")
def xs_fixture():  # type: ignore[no-untyped-def]
    """A dom0 xenstore client (C xenstored)."""
    client = XenPlatform().open_xenstore(timeout=30.0)
    yield client
    client.close()


@pytest.fixture
def checked_platform() -> CheckedPlatform:
    return CheckedPlatform()


@pytest.fixture
def no_vbd_left():
    """After the test: no vbd of either kind is left on the xen-backend bus (Linux blkback's
    vbd-*, and xtvbd-*, which the kernel lists, driverless, while our backend directory is
    there)."""
    yield
    left = [p.name for kind in ("vbd", "xtvbd") for p in XEN_BACKEND_BUS.glob(f"{kind}-*")]
    assert not left, f"vbds left behind: {left}"
