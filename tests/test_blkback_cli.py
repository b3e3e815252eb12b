"""`xentools blkback serve` and `python -m xentools.devices.blkback`: bad input gives one
clear line and a non-zero exit, never a traceback; a good run serves, stops on SIGTERM and
prints the conformance report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from hostile_frontend import RawFrontend
from xentools.core.xenbus import XenbusState
from xentools.devices.toolstack import create_vbd
from xentools.platform.sim.launcher import SoftwareXen

BACKEND_PATH = "/local/domain/0/backend/vbd/1/51712"
ENTRY_POINTS = {
    "cli": [sys.executable, "-m", "xentools", "blkback", "serve"],
    "module": [sys.executable, "-m", "xentools.devices.blkback"],
}


def run(entry: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    environment.pop("XENTOOLS_SIM_DIR", None)
    environment.update(env or {})
    return subprocess.run([*ENTRY_POINTS[entry], *args], capture_output=True, text=True, timeout=30,
                          env=environment, stdin=subprocess.DEVNULL)


def image(tmp_path, name: str, size: int, mode: int = 0o644) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    os.chmod(path, mode)
    return str(path)


BAD_INPUT = [
    ("missing image", lambda t: ["--image", str(t / "absent.img")], "image.missing"),
    ("image is a directory", lambda t: ["--image", str(t)], "image.not_a_file"),
    ("size not a multiple of 512", lambda t: ["--image", image(t, "odd.img", 1000)], "image.size"),
    ("size not a multiple of the sector size",
     lambda t: ["--image", image(t, "a.img", 3 * 512), "--sector-size", "4096"], "image.size"),
    ("read-only image opened for writing", lambda t: ["--image", image(t, "ro.img", 4096, 0o444)], "image.read_only"),
    ("backend path", lambda t: ["--image", image(t, "ok.img", 4096), "--backend-path", "/local/domain/0/vbd"], "backend.path"),
    ("no software Xen there", lambda t: ["--image", image(t, "ok.img", 4096), "--sim-dir", str(t / "nosim")], "xenstore"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("name,args,words", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_one_line(tmp_path, entry, name, args, words) -> None:
    argv = args(tmp_path)
    if "--backend-path" not in argv:
        argv += ["--backend-path", BACKEND_PATH]
    result = run(entry, *argv)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_option_values_are_usage_errors(tmp_path) -> None:
    ok = image(tmp_path, "ok.img", 4096)
    for extra in (["--max-ring-page-order", "5"], ["--max-queues", "0"], ["--max-indirect-segments", "4097"],
                  ["--sector-size", "3000"]):
        result = run("cli", "--backend-path", BACKEND_PATH, "--image", ok, *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr, extra


def test_backend_directory_without_toolstack_keys(tmp_path) -> None:
    with SoftwareXen(domains=(0, 1)) as xen:
        result = run("cli", "--sim-dir", xen.root_dir, "--backend-path", BACKEND_PATH,
                     "--image", image(tmp_path, "ok.img", 4096))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "backend.toolstack" in result.stderr and "Traceback" not in result.stderr


def test_cli_serves_and_prints_the_report_on_sigterm(tmp_path) -> None:
    with SoftwareXen(domains=(0, 1)) as xen:
        img = image(tmp_path, "disk.img", 1 << 20)
        xs = xen.platform(0).open_xenstore()
        paths = create_vbd(xs, backend_domid=0, frontend_domid=1, devid=51712, params=img)
        report = str(tmp_path / "report.json")
        proc = subprocess.Popen(
            [*ENTRY_POINTS["cli"], "--sim-dir", xen.root_dir, "--backend-path", paths.backend,
             "--image", img, "--max-queues", "2", "--max-ring-page-order", "1", "--report", report],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        fe = RawFrontend(xen.platform(1), paths.frontend, paths.backend, 0)
        try:
            fe.connect(order=1, queues=2)
            assert fe.features.multi_queue_max_queues == 2 and fe.features.max_ring_page_order == 1
            assert fe.write(0, b"\x42" * 4096, queue=1).status == 0
            assert fe.read(0, 4096)[1] == b"\x42" * 4096
            assert fe.discard(0, 8, secure=True).status != 0
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
            assert proc.returncode == 0, err
            assert fe.backend_state() == XenbusState.Closed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            fe.close()
            xs.close()
        printed = json.loads(out)
        with open(report) as f:
            assert json.load(f) == printed
        assert printed["frontends"][paths.frontend]["violations"] == {"discard.secure_not_advertised": 1}
