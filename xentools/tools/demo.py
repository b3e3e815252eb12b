"""`xentools demo`: the whole stack on one machine, verified, in a few seconds.

Owns: `LocalRig` (a software Xen, a RAW image in a temporary directory, blkback serving it
from its own process, and the vbd between them; bench.py uses it too) and the `demo`
command: attach the userspace blkfront, print what was negotiated, run a verified mixed
workload (`mixed_workload`, which the end-to-end tests run too: direct and indirect
requests, flush, discard, several queues), print throughput,
check blkback's conformance report, clean up, and end with one line starting `demo: OK`.
Must not: implement a device or a platform; it only wires them together as a user would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import click

from xentools.core.errors import XentoolsError
from xentools.core.vbd import encode_vbd
from xentools.devices.blkfront import BlkFront, BlkfrontConfig, BlkfrontError
from xentools.devices.toolstack import create_vbd

MIB = 1 << 20
FRONTEND_DOMID = 1
BACKEND_DOMID = 0
DEVID = encode_vbd("xvda")


class DemoError(XentoolsError):
    """The demo or bench could not run, or found wrong data. One line, with the rule."""


class LocalRig:
    """A software Xen with dom0 (backend) and dom1 (frontend), a RAW image of `size` bytes
    of seeded random data, and `python -m xentools blkback serve` serving it as xvda.

    Use as a context manager; everything (processes, sockets, the image) is gone after.
    `backend_args` are extra blkback options. `shadow` holds the image's content; with
    shadow=False (the bench) no copy is kept and the image is one random MiB, rotated per MiB.
    """

    def __init__(self, size: int, *, seed: int = 1, backend_args: tuple[str, ...] = (), shadow: bool = True) -> None:
        self.size = size
        self.keep_shadow = shadow
        self.seed = seed
        self.backend_args = backend_args
        self.workdir = ""
        self.image = ""
        self.xen = None
        self.backend: subprocess.Popen | None = None
        self.shadow = bytearray()
        self.report: dict[str, Any] = {}

    def __enter__(self) -> LocalRig:
        from xentools.platform.sim.launcher import SoftwareXen

        try:
            self.workdir = tempfile.mkdtemp(prefix="xentools-demo-")
            self.image = os.path.join(self.workdir, "disk.img")
            rng = random.Random(self.seed)
            block = b"" if self.keep_shadow else rng.randbytes(MIB)
            with open(self.image, "wb") as f:
                for offset in range(0, self.size, MIB):
                    if self.keep_shadow:
                        chunk = rng.randbytes(min(MIB, self.size - offset))
                        self.shadow += chunk
                    else:
                        turn = offset // MIB * 4099 % MIB
                        chunk = (block[turn:] + block[:turn])[: self.size - offset]
                    f.write(chunk)
            self.xen = SoftwareXen(domains=(BACKEND_DOMID, FRONTEND_DOMID)).start()
            xs = self.xen.platform(BACKEND_DOMID).open_xenstore()
            try:
                paths = create_vbd(
                    xs, backend_domid=BACKEND_DOMID, frontend_domid=FRONTEND_DOMID, devid=DEVID, params=self.image
                )
            finally:
                xs.close()
            self.backend_log = os.path.join(self.workdir, "blkback.log")
            with open(self.backend_log, "wb") as log:
                self.backend = subprocess.Popen(
                    [sys.executable, "-m", "xentools", "blkback", "serve", "--sim-dir", self.xen.root_dir,
                     "--backend-path", paths.backend, "--image", self.image, "--report", "-", *self.backend_args],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def attach(self, config: BlkfrontConfig) -> BlkFront:
        assert self.xen is not None
        try:
            return BlkFront.attach(self.xen.platform(FRONTEND_DOMID), DEVID, config=config)
        except BlkfrontError:
            if self.backend is not None and self.backend.poll() is not None:
                raise DemoError("rig.backend_died", f"blkback exited ({self.backend.returncode}): {self._log_tail()}") from None
            raise

    def _log_tail(self) -> str:
        try:
            with open(self.backend_log, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    def stop_backend(self) -> dict[str, Any]:
        """SIGTERM blkback and return its conformance report (printed on its stdout)."""
        proc, self.backend = self.backend, None
        if proc is None:
            return self.report
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            raise DemoError("rig.backend_failed", f"blkback exited with {proc.returncode}: {self._log_tail()}")
        try:
            self.report = json.loads(out) if out.strip() else {}
        except ValueError:
            raise DemoError("rig.backend_report", f"blkback printed no JSON report: {out[:200]!r}") from None
        return self.report

    def image_contents(self) -> bytes:
        with open(self.image, "rb") as f:
            return f.read()

    def __exit__(self, *exc: object) -> None:
        if self.backend is not None:
            self.backend.kill()
            self.backend.communicate()
            self.backend = None
        if self.xen is not None:
            self.xen.stop()
            self.xen = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _features(dev: BlkFront) -> str:
    info = dev.info
    assert info is not None
    parts = [
        f"protocol {info.protocol}",
        f"{info.num_queues} queues x ring order {info.ring_page_order} ({info.ring_entries} entries)",
        f"indirect {info.max_indirect_segments} segments" if info.max_indirect_segments else "indirect off",
        f"{info.segments_per_request} segments per request",
        "persistent grants" if info.persistent else "grants per request",
    ]
    parts += [name for name, on in (("flush-cache", info.flush_cache), ("barrier", info.barrier),
                                     ("discard", info.discard)) if on]
    return ", ".join(parts)


def _check(got: bytes, want: bytes | bytearray, what: str) -> None:
    if got != want:
        first = next(i for i in range(min(len(got), len(want))) if got[i] != want[i]) if len(got) == len(want) else 0
        raise DemoError("demo.mismatch", f"{what}: data differs (first at byte {first})")


def mixed_workload(dev: BlkFront, shadow: bytearray, rng: random.Random, total: int, *,
                   choose: Callable[[random.Random], int], depth: int) -> int:
    """Random reads and writes of choose(rng) sectors each, `total` bytes in all, up to
    `depth` in flight with no two in flight overlapping; every read is compared with
    `shadow`, kept up to date by the writes (DemoError "demo.mismatch" on a difference).
    Returns the bytes moved. The demo and the end-to-end tests both run it."""
    ss = dev.sector_size
    sectors = len(shadow) // ss
    moved = 0
    while moved < total:
        batch = []
        busy: list[tuple[int, int]] = []
        with dev.batch():
            for _ in range(depth):
                nr = max(1, min(choose(rng), sectors))
                sector = rng.randrange(sectors - nr + 1)
                if any(sector < end and start < sector + nr for start, end in busy):
                    continue
                busy.append((sector, sector + nr))
                lo, hi = sector * ss, (sector + nr) * ss
                if rng.random() < 0.5:
                    data = rng.randbytes(hi - lo)
                    shadow[lo:hi] = data
                    batch.append((dev.submit_write(sector, data), None))
                else:
                    batch.append((dev.submit_read(sector, nr), (lo, hi)))
                moved += hi - lo
        for fut, span in batch:
            result = fut.result(60)
            if span is not None:
                _check(result, shadow[span[0] : span[1]], f"read of bytes {span[0]}..{span[1]}")
    return moved


def _mixed(dev: BlkFront, shadow: bytearray, rng: random.Random, total: int) -> tuple[int, float]:
    """Random reads and writes of 512 B .. 1 MiB, 32 in flight; returns (bytes moved, seconds)."""
    sizes = [1, 8, 16, 88, 256, 512, 2048]  # direct ones, then indirect ones
    started = time.monotonic()
    moved = mixed_workload(dev, shadow, rng, total, choose=lambda r: r.choice(sizes), depth=32)
    return moved, time.monotonic() - started


def _sequential_read(dev: BlkFront, shadow: bytearray, depth: int = 8) -> float:
    """Read the whole disk in 1 MiB requests, `depth` in flight, verifying. Returns seconds."""
    started = time.monotonic()
    offsets = list(range(0, len(shadow), MIB))
    pending = []
    for offset in offsets:
        pending.append((offset, dev.submit_read(offset // 512, min(MIB, len(shadow) - offset) // 512)))
        if len(pending) >= depth:
            off, fut = pending.pop(0)
            _check(fut.result(60), shadow[off : off + MIB], f"sequential read at {off}")
    for off, fut in pending:
        _check(fut.result(60), shadow[off : off + MIB], f"sequential read at {off}")
    return time.monotonic() - started


@click.command("demo")
@click.option("--size-mib", type=click.IntRange(8, 4096), default=32, show_default=True, help="Image size.")
@click.option("--queues", type=click.IntRange(1, 4), default=4, show_default=True)
@click.option("--seed", type=int, default=2024, show_default=True, help="Seed of the image and the workload.")
def demo(size_mib: int, queues: int, seed: int) -> None:
    """Software Xen + blkback + blkfront on one machine: a verified mixed workload."""
    size = size_mib * MIB
    say = click.echo
    with LocalRig(size, seed=seed) as rig:
        assert rig.xen is not None
        say(f"demo: software Xen in {rig.xen.root_dir}; {size_mib} MiB RAW image {rig.image}")
        say(f"demo: blkback serving it as xvda of domain {FRONTEND_DOMID} (pid {rig.backend.pid})")
        config = BlkfrontConfig(ring_page_order=4, num_queues=queues, max_indirect_segments=256, persistent=True)
        dev = rig.attach(config)
        try:
            info = dev.info
            assert info is not None
            say(f"demo: negotiated {_features(dev)}")
            if info.sectors * info.sector_size != size:
                raise DemoError("demo.size", f"the disk has {info.sectors} sectors, the image {size} bytes")
            shadow = rig.shadow
            seconds = _sequential_read(dev, shadow)
            say(f"demo: sequential read of {size_mib} MiB verified: {size / MIB / seconds:.0f} MiB/s")
            moved, seconds = _mixed(dev, shadow, random.Random(seed), 2 * size)
            say(f"demo: mixed random reads/writes of {moved / MIB:.0f} MiB verified: {moved / MIB / seconds:.0f} MiB/s")
            dev.flush()
            rng = random.Random(seed + 1)
            start = rng.randrange(len(shadow) // 512 - 4096)
            dev.discard(start, 4096)  # discarded content is unspecified (blkif.h): write it again
            data = rng.randbytes(4096 * 512)
            dev.write(start, data)
            shadow[start * 512 : (start + 4096) * 512] = data
            dev.flush()
            say(f"demo: flushed; discarded and rewrote 2 MiB at sector {start}")
            seconds = _sequential_read(dev, shadow)
            stats = dict(dev.stats)
            per_queue = [queue.requests for queue in dev._rings.queues]
        finally:
            dev.close()
        if dev.failed is not None:
            raise DemoError("demo.device_failed", f"{dev.failed[0]}: {dev.failed[1]}")
        _check(rig.image_contents(), shadow, "image file after close")
        say(f"demo: whole disk verified again, and the image file matches ({size / MIB / seconds:.0f} MiB/s)")
        report = rig.stop_backend()
        violations = report.get("total", 0)
        if violations:
            raise DemoError("demo.violations", f"blkback counted {violations} protocol violations: {report}")
        if stats["indirect_requests"] == 0 or stats["direct_requests"] == 0 or min(per_queue) == 0:
            raise DemoError("demo.coverage", f"the workload missed a request kind or a queue: {stats}, {per_queue}")
    say(
        f"demo: OK: {stats['requests']} requests ({stats['direct_requests']} direct, "
        f"{stats['indirect_requests']} indirect) on {len(per_queue)} queues {per_queue}, "
        f"all data verified, 0 protocol violations"
    )
