"""`xentools blk read|write|verify|info`: the userspace blkfront against a running backend.

Owns: the click group `blk`: attaching a frontend to a vbd (`--sim-dir`, `--domid`, `--vdev`
xvda|51712|<frontend path>|<xl disk spec>; `--vbd` is its old spelling), the four commands, `--json` output on stdout and progress on
stderr (click.progressbar, which prints only its label when stderr is not a terminal).
Must not: implement the frontend (devices/blkfront.py does) or print tracebacks: every
expected failure is a XentoolsError, printed by the CLI as one line with a non-zero exit.

Each command attaches, works, and closes the frontend again (the backend sees Closed and
waits for the next connection, as blkif.h's reconnect allows).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Iterator

import click

from xentools.core.diskspec import DiskSpecError, looks_like_disk_spec, parse_disk_spec
from xentools.core.errors import XentoolsError
from xentools.devices.blkfront import BlkFront, BlkfrontConfig, BlkfrontError, ConnectTimeout
from xentools.tools.options import domid_option, sim_dir_option, vdev_option

CHUNK_BYTES = 4 << 20  # a long transfer goes in 4 MiB operations, DEPTH of them in flight
DEPTH = 4


def pattern_bytes(seed: int, offset: int, length: int) -> bytes:
    """Deterministic content for `write --pattern`/`verify --pattern`: every 16-byte cell
    of the disk holds (cell index, seed), so misplaced data shows where it came from."""
    first = offset // 16
    last = (offset + length + 15) // 16
    cells = struct.pack(f"<{2 * (last - first)}Q", *[v for i in range(first, last) for v in (i, seed)])
    start = offset - first * 16
    return cells[start : start + length]


def _frontend_options(fn):
    for option in reversed(
        [
            sim_dir_option(),
            domid_option(default=None, help="Frontend domain (default: this domain; dom0 on the software Xen)."),
            vdev_option("--vbd", default="xvda", show_default=True,
                        help="The disk: a name (xvda), a virtual-device number (51712), a frontend path, "
                             "or an xl disk spec naming a vdev (\"vdev=xvda, ...\")."),
            click.option("--ring-page-order", type=click.IntRange(0, 4), default=2, show_default=True),
            click.option("--queues", type=click.IntRange(1, 16), default=2, show_default=True),
            click.option("--max-indirect-segments", type=click.IntRange(0, 4096), default=256, show_default=True),
            click.option("--no-persistent", is_flag=True, help="Do not ask for persistent grants."),
            click.option("--protocol", type=click.Choice(["x86_64-abi", "x86_32-abi"]), default="x86_64-abi",
                         show_default=True),
            click.option("--timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
                         help="Seconds to wait for the backend to connect."),
            click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout."),
        ]
    ):
        fn = option(fn)
    return fn


@contextlib.contextmanager
def _attached(opts: dict) -> Iterator[BlkFront]:
    from xentools.platform.select import open_platform

    config = BlkfrontConfig(
        ring_page_order=opts["ring_page_order"],
        num_queues=opts["queues"],
        max_indirect_segments=opts["max_indirect_segments"],
        persistent=not opts["no_persistent"],
        protocol=opts["protocol"],
        connect_timeout=opts["timeout"],
    )
    vbd: str | int = opts["vdev"]
    if looks_like_disk_spec(vbd):
        spec = parse_disk_spec(vbd)
        if not spec.vdev:
            raise DiskSpecError("diskspec.no_vdev", f"the disk spec {vbd!r} names no vdev: add vdev=xvda")
        vbd = spec.vdev
    platform = open_platform(opts["sim_dir"], opts["domid"])
    try:
        try:
            dev = BlkFront.attach(platform, vbd, config=config)
        except BlkfrontError as err:
            raise _with_fix(err, platform.domid, vbd) from None
        try:
            yield dev
        finally:
            dev.close()
    finally:
        platform.close()


def _with_fix(err: BlkfrontError, domid: int, vbd: str | int) -> BlkfrontError:
    """The attach failure, with what the user does about it when it is a step they skipped."""
    if err.rule == "xenstore.missing" and "/device/vbd/" in err.detail:
        fix = f"create the vbd first: `xentools vbd create --domid {domid} --vdev {vbd} --image IMAGE`"
    elif isinstance(err, ConnectTimeout) and "InitWait" in err.detail:
        fix = "is its backend running? start it: `xentools blkback serve --backend-path BACKEND --image IMAGE`"
    else:
        return err
    return type(err)(err.rule, f"{err.detail}: {fix}")


def _range(dev: BlkFront, sector: int, count: int | None) -> tuple[int, int]:
    total = dev.sectors
    if count is None:
        count = total - sector
    if sector < 0 or count < 1 or sector + count > total:
        raise BlkfrontError("request.range", f"sectors {sector}+{count} are outside the disk (0..{total - 1})")
    return sector, count


def _chunks(dev: BlkFront, sector: int, count: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // dev.sector_size)
    for start in range(sector, sector + count, step):
        yield start, min(step, sector + count - start)


def _stream_read(dev: BlkFront, sector: int, count: int, label: str) -> Iterator[tuple[int, bytes]]:
    """(sector, data) of [sector, sector+count) in order, DEPTH chunks in flight, with a
    progress bar on stderr."""
    pending = []
    chunks = iter(_chunks(dev, sector, count))
    with click.progressbar(length=count * dev.sector_size, label=label, file=sys.stderr) as bar:
        while True:
            while len(pending) < DEPTH:
                nxt = next(chunks, None)
                if nxt is None:
                    break
                pending.append((nxt[0], dev.submit_read(*nxt)))
            if not pending:
                return
            start, fut = pending.pop(0)
            data = fut.result()
            bar.update(len(data))
            yield start, data


def _emit(as_json: bool, record: dict, text: str) -> None:
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
    else:
        click.echo(text)


@click.group("blk")
def blk() -> None:
    """Drive a vbd with the userspace blkfront (its backend must be running)."""


@blk.command("info")
@_frontend_options
def info_cmd(**opts) -> None:
    """Attach, print the disk and the negotiated features, detach."""
    with _attached(opts) as dev:
        info = dev.info
        assert info is not None
        record = info.to_dict()
    features = [name for name in ("persistent", "flush_cache", "barrier", "discard", "discard_secure") if record[name]]
    _emit(
        opts["as_json"],
        record,
        f"{record['frontend_path']} -> {record['backend_path']} (backend domain {record['backend_id']})\n"
        f"disk: {record['sectors']} sectors of {record['sector_size']} bytes "
        f"({record['size_bytes'] / (1 << 20):.1f} MiB){', read-only' if record['readonly'] else ''}\n"
        f"rings: {record['num_queues']} x order {record['ring_page_order']} ({record['ring_entries']} entries), "
        f"{record['protocol']}; {record['segments_per_request']} segments per request "
        f"(indirect {record['max_indirect_segments'] or 'off'})\n"
        f"features: {', '.join(features) or 'none'}",
    )


@blk.command("read")
@_frontend_options
@click.option("--sector", type=click.IntRange(0, None), default=0, show_default=True)
@click.option("--count", type=click.IntRange(1, None), default=None, help="Sectors (default: to the end).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the data here ('-' for stdout); otherwise only its SHA-256 is printed.")
def read_cmd(sector: int, count: int | None, output: str | None, **opts) -> None:
    """Read sectors; print their SHA-256 (and save them with --output)."""
    if output == "-" and opts["as_json"]:
        raise BlkfrontError("cli.usage", "--output - and --json both want stdout")
    digest = hashlib.sha256()
    started = time.monotonic()
    with _attached(opts) as dev:
        sector, count = _range(dev, sector, count)
        sink = None
        try:
            if output == "-":
                sink = sys.stdout.buffer
            elif output is not None:
                sink = open(output, "wb")  # noqa: SIM115 - closed below
            for _, data in _stream_read(dev, sector, count, "reading"):
                digest.update(data)
                if sink is not None:
                    sink.write(data)
        finally:
            if sink is not None and sink is not sys.stdout.buffer:
                sink.close()
        nbytes = count * dev.sector_size
    seconds = time.monotonic() - started
    record = {"sector": sector, "count": count, "bytes": nbytes, "sha256": digest.hexdigest(),
              "seconds": round(seconds, 3)}
    if output == "-":
        sys.stdout.buffer.flush()
        return
    _emit(opts["as_json"], record, f"read {nbytes} bytes from sector {sector}: sha256 {digest.hexdigest()}")


@blk.command("write")
@_frontend_options
@click.option("--sector", type=click.IntRange(0, None), default=0, show_default=True)
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, allow_dash=True), default=None,
              help="Data to write (a whole number of sectors; '-' for stdin).")
@click.option("--pattern", type=click.IntRange(0, 2**63), default=None,
              help="Write the deterministic pattern of this seed instead (needs --count).")
@click.option("--count", type=click.IntRange(1, None), default=None, help="Sectors to write with --pattern.")
@click.option("--flush/--no-flush", default=True, show_default=True, help="Flush the backend's cache after.")
def write_cmd(sector: int, input_path: str | None, pattern: int | None, count: int | None, flush: bool, **opts) -> None:
    """Write a file (or a pattern) at a sector."""
    if (input_path is None) == (pattern is None):
        raise BlkfrontError("cli.usage", "give exactly one of --input and --pattern")
    if pattern is not None and count is None:
        raise BlkfrontError("cli.usage", "--pattern needs --count")
    data: bytes | None = None
    if input_path is not None:
        data = sys.stdin.buffer.read() if input_path == "-" else open(input_path, "rb").read()  # noqa: SIM115
    started = time.monotonic()
    with _attached(opts) as dev:
        ss = dev.sector_size
        if data is not None:
            if not data or len(data) % ss:
                raise BlkfrontError("request.length", f"{len(data)} bytes is not a whole number of {ss}-byte sectors")
            count = len(data) // ss
        assert count is not None
        sector, count = _range(dev, sector, count)
        pending = []
        with click.progressbar(length=count * ss, label="writing", file=sys.stderr) as bar:
            for start, n in _chunks(dev, sector, count):
                lo = (start - sector) * ss
                chunk = data[lo : lo + n * ss] if data is not None else pattern_bytes(pattern or 0, start * ss, n * ss)
                pending.append((dev.submit_write(start, chunk), n * ss))
                while len(pending) >= DEPTH:
                    fut, size = pending.pop(0)
                    fut.result()
                    bar.update(size)
            for fut, size in pending:
                fut.result()
                bar.update(size)
        if flush:
            dev.flush()
        nbytes = count * ss
    record = {"sector": sector, "count": count, "bytes": nbytes, "flushed": flush,
              "seconds": round(time.monotonic() - started, 3)}
    _emit(opts["as_json"], record, f"wrote {nbytes} bytes at sector {sector}")


@blk.command("verify")
@_frontend_options
@click.option("--sector", type=click.IntRange(0, None), default=0, show_default=True)
@click.option("--count", type=click.IntRange(1, None), default=None, help="Sectors (default: to the end).")
@click.option("--against", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Compare with this file, byte for byte at the same offsets (e.g. the backend's image).")
@click.option("--pattern", type=click.IntRange(0, 2**63), default=None,
              help="Compare with the pattern `write --pattern SEED` wrote.")
def verify_cmd(sector: int, count: int | None, against: str | None, pattern: int | None, **opts) -> None:
    """Read sectors and compare them with a file or a pattern; fail on any difference."""
    if (against is None) == (pattern is None):
        raise BlkfrontError("cli.usage", "give exactly one of --against and --pattern")
    bad: list[int] = []
    checked = 0
    with contextlib.ExitStack() as stack:
        reference = stack.enter_context(open(against, "rb")) if against is not None else None
        dev = stack.enter_context(_attached(opts))
        ss = dev.sector_size
        sector, count = _range(dev, sector, count)
        for start, data in _stream_read(dev, sector, count, "verifying"):
            if reference is not None:
                expected = os.pread(reference.fileno(), len(data), start * ss)
            else:
                expected = pattern_bytes(pattern or 0, start * ss, len(data))
            if data != expected:
                for index in range(len(data) // ss):
                    if data[index * ss : (index + 1) * ss] != expected[index * ss : (index + 1) * ss]:
                        bad.append(start + index)
            checked += len(data) // ss
    record = {"sector": sector, "count": count, "checked": checked, "mismatched": len(bad),
              "first_mismatches": bad[:16], "ok": not bad}
    _emit(opts["as_json"], record, f"verified {checked} sectors from {sector}: "
          + ("all match" if not bad else f"{len(bad)} differ, first at sector {bad[0]}"))
    if bad:
        raise VerifyMismatch("verify.mismatch", f"{len(bad)} sectors differ, first at sector {bad[0]}")


class VerifyMismatch(XentoolsError):
    """`blk verify` found sectors that differ (exit status 1)."""
