"""The `xentools blk`, `demo` and `bench` commands, run as a user runs them (subprocesses).

`blk info|read|write|verify` against blkback serving an image over one software Xen (JSON on
stdout, progress on stderr); `demo` ending with `demo: OK`; `bench --json` printing its keys
(a smoke test: no figure is judged here); bad input (an unparsable disk, a backend that never
reaches InitWait, a mismatch) giving one line on stderr, a non-zero exit and no traceback.
"""

from __future__ import annotations

import json
import random
import statistics
import signal
import subprocess
import sys

import pytest

from xentools.devices.toolstack import create_vbd
from xentools.tools.blk_cmd import pattern_bytes

IMAGE_BYTES = 8 << 20


def xentools(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xentools", *args], capture_output=True, text=True, timeout=timeout
    )


def one_error_line(proc: subprocess.CompletedProcess, rule: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    # Progress labels may come first (stderr is not a terminal); the error is one last line.
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:], proc.stderr
    assert lines[-1].startswith("xentools: error: ") and rule in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, xen):
    """A software Xen whose xvda (domain 1) is an 8 MiB image served by blkback; xvdb exists
    in xenstore but no backend ever serves it."""
    tmp = tmp_path_factory.mktemp("blk")
    image = tmp / "disk.img"
    image.write_bytes(random.Random(9).randbytes(IMAGE_BYTES))
    xs = xen.platform(0).open_xenstore()
    paths = create_vbd(xs, backend_domid=0, frontend_domid=1, devid=51712, params=str(image))
    create_vbd(xs, backend_domid=0, frontend_domid=1, devid=51728, params=str(image))
    xs.close()
    backend = subprocess.Popen(
        [sys.executable, "-m", "xentools", "blkback", "serve", "--sim-dir", xen.root_dir,
         "--backend-path", paths.backend, "--image", str(image), "--report", "-"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        yield xen.root_dir, image
    finally:
        backend.send_signal(signal.SIGTERM)
        out, err = backend.communicate(timeout=20)
    assert backend.returncode == 0, err
    assert json.loads(out)["total"] == 0  # our frontend broke no rule


def blk(sim_dir: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return xentools("blk", *args[:1], "--sim-dir", sim_dir, "--domid", "1", *args[1:], timeout=timeout)


def test_info_json(served):
    sim_dir, _ = served
    proc = blk(sim_dir, "info", "--vdev", "xvda", "--json", "--queues", "3", "--protocol", "x86_32-abi")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["sectors"] == IMAGE_BYTES // 512 and info["size_bytes"] == IMAGE_BYTES
    assert (info["num_queues"], info["protocol"], info["persistent"]) == (3, "x86_32-abi", True)
    assert info["frontend_path"] == "/local/domain/1/device/vbd/51712"
    text = blk(sim_dir, "info", "--vbd", "51712")
    assert text.returncode == 0 and "8.0 MiB" in text.stdout


def test_write_read_verify_round_trip(served, tmp_path):
    sim_dir, image = served
    proc = blk(sim_dir, "write", "--pattern", "5", "--sector", "100", "--count", "3000", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {**json.loads(proc.stdout), "sector": 100, "count": 3000, "bytes": 3000 * 512}
    assert "writing" in proc.stderr  # progress goes to stderr
    proc = blk(sim_dir, "verify", "--pattern", "5", "--sector", "100", "--count", "3000", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    assert image.read_bytes()[100 * 512 : 3100 * 512] == pattern_bytes(5, 100 * 512, 3000 * 512)
    out = tmp_path / "out.bin"
    proc = blk(sim_dir, "read", "--sector", "90", "--count", "20", "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == image.read_bytes()[90 * 512 : 110 * 512]
    raw = subprocess.run(
        [sys.executable, "-m", "xentools", "blk", "read", "--sim-dir", sim_dir, "--domid", "1",
         "--count", "8", "--output", "-"], capture_output=True, timeout=60,
    )
    assert raw.returncode == 0 and raw.stdout == image.read_bytes()[:4096]
    proc = blk(sim_dir, "verify", "--against", str(image), "--json", "--no-persistent")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["checked"] == IMAGE_BYTES // 512


def test_write_from_file(served, tmp_path):
    sim_dir, image = served
    data = random.Random(4).randbytes(64 * 512)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    proc = blk(sim_dir, "write", "--input", str(src), "--sector", "7000")
    assert proc.returncode == 0, proc.stderr
    assert image.read_bytes()[7000 * 512 : 7064 * 512] == data
    src.write_bytes(b"x" * 100)
    one_error_line(blk(sim_dir, "write", "--input", str(src)), "request.length")


def test_verify_mismatch_is_one_line_and_exit_1(served):
    sim_dir, _ = served
    proc = blk(sim_dir, "verify", "--pattern", "6", "--sector", "100", "--count", "8")
    line = one_error_line(proc, "verify.mismatch")
    assert "8 sectors differ, first at sector 100" in line


def test_disk_named_by_an_xl_disk_spec(served):
    sim_dir, image = served
    proc = blk(sim_dir, "info", "--vdev", f"format=raw, vdev=xvda, access=rw, target={image}", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["frontend_path"] == "/local/domain/1/device/vbd/51712"
    one_error_line(blk(sim_dir, "info", "--vdev", f"format=raw, target={image}"), "diskspec.no_vdev")
    one_error_line(blk(sim_dir, "info", "--vdev", "vdev=xvda, colour=red"), "diskspec.unknown_key")


def test_blkback_serves_an_xl_disk_spec(served):
    sim_dir, image = served
    from xentools.devices.toolstack import destroy_vbd
    from xentools.platform.sim.platform import SoftwarePlatform

    # An image of its own: the fixture's image is served writable, and blkback refuses to
    # serve an image that another server writes (xl's rule; w! overrides).
    image = image.with_name("ro.img")
    image.write_bytes(random.Random(10).randbytes(IMAGE_BYTES))
    xs = SoftwarePlatform(sim_dir, 0).open_xenstore()
    paths = create_vbd(xs, backend_domid=0, frontend_domid=1, devid=51744, params=str(image), mode="r")
    backend = paths.backend
    bad = xentools("blkback", "serve", "--sim-dir", sim_dir, "--backend-path", backend,
                   "--image", f"format=qcow2, target={image}")
    one_error_line(bad, "diskspec.format")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xentools", "blkback", "serve", "--sim-dir", sim_dir, "--backend-path", backend,
         "--image", f"format=raw, vdev=xvdc, access=ro, target={image}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = blk(sim_dir, "info", "--vdev", "xvdc", "--json")
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["readonly"] is True  # access=ro reached the backend
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        destroy_vbd(xs, paths)
        xs.close()
    assert proc.returncode == 0


@pytest.mark.parametrize("spec", ["xvd!", "sdz99", "/bad//path", "banana"])
def test_unparsable_disk_spec(served, spec):
    sim_dir, _ = served
    one_error_line(blk(sim_dir, "info", "--vdev", spec), "vbd.spec")


def test_backend_never_reaching_initwait(served):
    sim_dir, _ = served
    line = one_error_line(blk(sim_dir, "info", "--vdev", "xvdb", "--timeout", "0.5"), "connect.timeout")
    assert "never reached InitWait" in line and "Initialising (1)" in line
    assert "start it: `xentools blkback serve --backend-path" in line  # the fix, named


def test_missing_vbd_names_vbd_create(served):
    sim_dir, _ = served
    line = one_error_line(blk(sim_dir, "info", "--vdev", "xvdp"), "xenstore.missing")
    assert "create the vbd first: `xentools vbd create --domid 1 --vdev xvdp --image IMAGE`" in line


def test_out_of_range_and_usage_errors(served):
    sim_dir, _ = served
    one_error_line(blk(sim_dir, "read", "--sector", str(IMAGE_BYTES // 512)), "request.range")
    one_error_line(blk(sim_dir, "write", "--pattern", "1"), "cli.usage")


def test_demo_ends_with_ok():
    proc = xentools("demo", "--size-mib", "16", timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("demo: OK")
    assert any("negotiated" in line and "indirect" in line for line in lines)
    assert "Traceback" not in proc.stderr


def test_bench_json_keys():
    proc = xentools("bench", "--json", "--size-mib", "16", "--seconds", "0.2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("seq_read_1m_mbps", "seq_read_1m_ratio", "rand_read_4k_qd32_iops", "rand_read_4k_qd32_ratio",
                "rand_read_4k_qd32_rounds_iops", "rand_read_4k_qd32_rounds_ratio"):
        assert isinstance(result[key], (int, float)) and result[key] > 0
    # The headline 4 KiB figure is read_many's, its sampled places checked against pread
    # (STREAM_SAMPLES per call of STREAM_CHUNK requests; at least one pass per round).
    from xentools.tools.bench import RAND_OFFSETS, STREAM_CHUNK, STREAM_SAMPLES

    calls_per_pass = -(-RAND_OFFSETS // STREAM_CHUNK)
    assert result["wrong_data"] == 0 and result["checked_reads"] >= 3 * calls_per_pass * STREAM_SAMPLES
    for key in ("rand_read_4k_cpu_us_per_request", "rand_read_4k_rounds_cpu_us_per_request"):
        assert result[key]["total"] > 0 and {"frontend", "backend"} <= set(result[key])
    assert result["config"]["image_mib"] == 16 and result["config"]["rand_depth"] == 32
    # The headline figures are the medians of the interleaved rounds, each listed.
    rounds = result["rounds"]
    assert len(rounds) == result["config"]["rounds"] == 9
    for key in ("seq_read_1m_ratio", "rand_read_4k_qd32_ratio", "seq_read_1m_raw_pread_mbps"):
        assert result[key] == round(statistics.median(one[key] for one in rounds), 3 if "ratio" in key else 1)
    for one in rounds:
        assert one["rand_read_4k_qd32_ratio"] == round(one["rand_read_4k_qd32_iops"] / one["rand_read_4k_raw_pread_iops"], 3)
    totals = sorted(one["rand_read_4k_cpu_us_per_request"]["total"] for one in rounds)
    assert result["rand_read_4k_cpu_us_per_request"]["total"] == totals[4]
    # Each target's verdict is the one its rounds give (bench_verdict; judged in its own tests).
    from xentools.tools.bench import TARGETS
    from xentools.tools.bench_verdict import verdict

    assert result["verdicts"] == {
        "seq_read_1m_ratio": verdict([one["seq_read_1m_ratio"] for one in rounds], TARGETS["seq_read_1m_ratio"]),
        "rand_read_4k_qd32_ratio": verdict([one["rand_read_4k_qd32_ratio"] for one in rounds],
                                           TARGETS["rand_read_4k_qd32_ratio"]),
        "rand_read_4k_cpu_us_per_request_total": verdict(totals, TARGETS["rand_read_4k_cpu_us_per_request_total"],
                                                         higher_is_better=False),
    }
