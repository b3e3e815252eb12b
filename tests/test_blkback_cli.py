"""`xentools blkback serve` (the one blkback entry point): bad input gives one
clear line and a non-zero exit, never a traceback; an image that cannot be served reaches
the frontend (error node, state Closing); one blkback per vbd and one writer per image; the
vbd's params decide what is served; a good run serves, stops on SIGTERM and writes the
conformance report (to stdout only with --report -)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from hostile_frontend import RawFrontend
from test_images_support import vhd_footer
from xentools.core.xenbus import XenbusState
from xentools.devices.toolstack import create_vbd, destroy_vbd

BACKEND_PATH = "/local/domain/0/backend/vbd/1/51712"
ENTRY_POINTS = {
    "cli": [sys.executable, "-m", "xentools", "blkback", "serve"],
}
_DEVIDS = itertools.count(51712, 16)  # xvda, xvdb, ...: a fresh vbd for each test


def run(entry: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    environment.pop("XENTOOLS_SIM_DIR", None)
    environment.update(env or {})
    return subprocess.run([*ENTRY_POINTS[entry], *args], capture_output=True, text=True, timeout=30,
                          env=environment, stdin=subprocess.DEVNULL)


def image(tmp_path, name: str, size: int, mode: int = 0o644, data: bytes = b"") -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(max(size, len(data)))
    os.chmod(path, mode)
    return str(path)


def one_line(result: subprocess.CompletedProcess, words: str) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0] and "Traceback" not in result.stderr, lines[0]
    return lines[0]


@pytest.fixture
def xs(xen):
    client = xen.platform(0).open_xenstore()
    yield client
    client.close()


def new_vbd(xs, params: str, mode: str = "w"):  # type: ignore[no-untyped-def]
    return create_vbd(xs, backend_domid=0, frontend_domid=1, devid=next(_DEVIDS), params=params, mode=mode)


def read(xs, path: str) -> bytes | None:  # type: ignore[no-untyped-def]
    try:
        return xs.read(path)
    except Exception:
        return None


class Server:
    """A blkback serving a vbd in the background, until stop()."""

    def __init__(self, xen, backend: str, *args: str, report: str | None = None) -> None:  # type: ignore[no-untyped-def]
        argv = [*ENTRY_POINTS["cli"], "--sim-dir", xen.root_dir, "--backend-path", backend, *args]
        if report:
            argv += ["--report", report]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        self.out = self.err = ""

    def wait_state(self, xs, backend: str, state: int, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while read(xs, f"{backend}/state") != str(state).encode():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, f"{backend} never reached state {state}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.out, self.err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.out, self.err = self.proc.communicate()
        return self.proc.returncode


# -- bad input without a vbd -----------------------------------------------------------------

NO_VBD = [
    ("backend path", lambda t: ["--image", image(t, "ok.img", 4096), "--backend-path", "/local/domain/0/vbd"],
     "backend.path"),
    ("no software Xen there", lambda t: ["--image", image(t, "ok.img", 4096), "--sim-dir", str(t / "nosim"),
                                         "--backend-path", BACKEND_PATH], "xenstore"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("name,args,words", NO_VBD, ids=[b[0] for b in NO_VBD])
def test_bad_input_is_one_line(tmp_path, entry, name, args, words) -> None:
    result = run(entry, *args(tmp_path))
    one_line(result, words)
    assert result.stdout == ""


def test_bad_option_values_are_usage_errors(tmp_path) -> None:
    ok = image(tmp_path, "ok.img", 4096)
    for extra in (["--max-ring-page-order", "5"], ["--max-queues", "0"], ["--max-indirect-segments", "4097"],
                  ["--sector-size", "3000"]):
        result = run("cli", "--backend-path", BACKEND_PATH, "--image", ok, *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr, extra


@pytest.mark.parametrize("value", ["fast", "-1", "1001", "2.5"])
def test_a_bad_real_xen_watch_in_the_environment_is_one_line_and_exit_2(tmp_path, value) -> None:
    ok = image(tmp_path, "ok.img", 4096)
    result = run("cli", "--backend-path", BACKEND_PATH, "--image", ok, env={"XENTOOLS_BLKBACK_XEN_SPIN_US": value})
    line = one_line(result, "XENTOOLS_BLKBACK_XEN_SPIN_US")
    assert result.returncode == 2 and repr(value) in line, line


def test_backend_directory_without_toolstack_keys(tmp_path, xen) -> None:
    result = run("cli", "--sim-dir", xen.root_dir, "--backend-path", "/local/domain/0/backend/vbd/1/999",
                 "--image", image(tmp_path, "ok.img", 4096))
    line = one_line(result, "backend.toolstack")
    assert "xentools vbd create" in line


# -- an image that cannot be served: one line, and the frontend hears why ---------------------

QCOW2 = b"QFI\xfb" + struct.pack(">I", 3) + bytes(16) + struct.pack(">Q", 1 << 20) + bytes(100)
BAD_IMAGES = [
    ("missing image", lambda t: str(t / "absent.img"), [], "image.missing"),
    ("image is a directory", lambda t: str(t), [], "image.not_a_file"),
    ("size not a multiple of 512", lambda t: image(t, "odd.img", 1000), [], "image.size"),
    ("size not a multiple of the sector size", lambda t: image(t, "a.img", 3 * 512), ["--sector-size", "4096"],
     "image.size"),
    ("read-only image opened for writing", lambda t: image(t, "ro.img", 4096, 0o444), [], "image.read_only"),
    ("a VHD", lambda t: image(t, "disk.vhd", 0, data=bytes(1 << 20) + vhd_footer(1 << 20)), [], "image.not_raw"),
    ("a qcow2 named .raw", lambda t: image(t, "disk.raw", 0, data=QCOW2), [], "image.not_raw"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("name,make,extra,rule", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_an_image_that_cannot_be_served_reaches_the_frontend(tmp_path, xen, xs, entry, name, make, extra, rule) -> None:
    path = make(tmp_path)
    paths = new_vbd(xs, path)
    report = tmp_path / "report.json"
    try:
        result = run(entry, "--sim-dir", xen.root_dir, "--backend-path", paths.backend, *extra,
                     "--report", str(report))
        line = one_line(result, rule)
        assert result.stdout == ""
        # Linux's xenbus_dev_fatal: the reason in the error node, state Closing.
        assert read(xs, f"{paths.backend}/state") == b"5"
        error = read(xs, f"{paths.backend}/error").decode()
        assert rule in error and error.split(" ", 1)[0].isdigit()
        assert read(xs, "/local/domain/0/error/" + paths.backend.split("/", 4)[4] + "/error").decode() == error
        written = json.loads(report.read_text())
        assert written["frontends"][paths.frontend]["connects"] == 0 and rule in written["ended"]
    finally:
        destroy_vbd(xs, paths)
    if rule == "image.not_raw":
        # The command converts to another file: never onto the image itself.
        assert f"qemu-img convert -f {'vpc' if path.endswith('.vhd') else 'qcow2'} -O raw {path} " in line
        assert line.rsplit(" ", 1)[1] not in (path, "") and line.endswith(".raw")
    if rule == "image.size":
        assert "truncate -s %" in line


def test_blkfront_fails_at_once_with_the_backends_reason(tmp_path, xen, xs) -> None:
    from xentools.devices.blkfront import BlkFront
    from xentools.devices.blkfront_types import BlkfrontConfig, BlkfrontError

    paths = new_vbd(xs, str(tmp_path / "absent.img"))
    try:
        result = run("cli", "--sim-dir", xen.root_dir, "--backend-path", paths.backend)
        one_line(result, "image.missing")
        started = time.monotonic()
        with pytest.raises(BlkfrontError) as err:
            BlkFront.attach(xen.platform(1), paths.frontend, config=BlkfrontConfig(connect_timeout=30))
        assert time.monotonic() - started < 10  # not the 30 s timeout
        assert err.value.rule == "connect.backend_closed"
        assert "the backend says: image.missing" in str(err.value) and "absent.img" in str(err.value)
    finally:
        destroy_vbd(xs, paths)


# -- who serves what ------------------------------------------------------------------------


def test_a_second_blkback_on_the_same_vbd_is_refused_with_the_holders_pid(tmp_path, xen, xs) -> None:
    img = image(tmp_path, "disk.img", 1 << 20)
    paths = new_vbd(xs, img)
    first = Server(xen, paths.backend, report=str(tmp_path / "first.json"))
    try:
        first.wait_state(xs, paths.backend, XenbusState.InitWait)
        for entry in sorted(ENTRY_POINTS):
            result = run(entry, "--sim-dir", xen.root_dir, "--backend-path", paths.backend,
                         "--report", str(tmp_path / "second.json"))
            line = one_line(result, "backend.busy")
            assert f"pid {first.proc.pid}" in line
        # The first one was left alone: it serves, its vbd has no error, nobody was blamed.
        assert first.proc.poll() is None and read(xs, f"{paths.backend}/state") == b"2"
        assert read(xs, f"{paths.backend}/error") is None and not (tmp_path / "second.json").exists()
        fe = RawFrontend(xen.platform(1), paths.frontend, paths.backend, 0)
        try:
            fe.connect()
            assert fe.read(0, 4096)[0].status == 0
            fe.disconnect()
        finally:
            fe.close()
        assert first.stop() == 0, first.err
        report = json.loads((tmp_path / "first.json").read_text())
        assert report["total"] == 0 and report["frontends"][paths.frontend]["requests"]["checked"] == 1
    finally:
        first.stop(signal.SIGKILL)
        destroy_vbd(xs, paths)
    # The kernel released the lock with the process: the vbd can be served again.
    paths = new_vbd(xs, img)
    again = Server(xen, paths.backend)
    try:
        again.wait_state(xs, paths.backend, XenbusState.InitWait)
    finally:
        assert again.stop() == 0, again.err
        destroy_vbd(xs, paths)


def test_one_image_is_served_writable_once_unless_the_user_says_so(tmp_path, xen, xs) -> None:
    img = image(tmp_path, "shared.img", 1 << 20)
    first_paths, second_paths = new_vbd(xs, img), new_vbd(xs, img)
    first = Server(xen, first_paths.backend)
    try:
        first.wait_state(xs, first_paths.backend, XenbusState.InitWait)
        line = one_line(run("cli", "--sim-dir", xen.root_dir, "--backend-path", second_paths.backend),
                        "image.in_use")
        assert f"pid {first.proc.pid}" in line and "--shared-writable" in line
        assert read(xs, f"{second_paths.backend}/error") is None  # a refusal of the command, not of the vbd
        line = one_line(run("cli", "--sim-dir", xen.root_dir, "--backend-path", second_paths.backend,
                            "--read-only"), "image.in_use")
        assert "served writable" in line
        second = Server(xen, second_paths.backend, "--shared-writable")  # xl's w!
        try:
            second.wait_state(xs, second_paths.backend, XenbusState.InitWait)
        finally:
            assert second.stop() == 0, second.err
    finally:
        assert first.stop() == 0, first.err
    # Read-only twice is fine.
    first, second = (Server(xen, p.backend, "--read-only") for p in (first_paths, second_paths))
    try:
        first.wait_state(xs, first_paths.backend, XenbusState.InitWait)
        second.wait_state(xs, second_paths.backend, XenbusState.InitWait)
    finally:
        assert first.stop() == 0 and second.stop() == 0, (first.err, second.err)
        destroy_vbd(xs, first_paths)
        destroy_vbd(xs, second_paths)


def test_blkback_serves_what_params_says(tmp_path, xen, xs) -> None:
    served = image(tmp_path, "served.img", 1 << 20, data=b"\x11" * 4096)
    other = image(tmp_path, "other.img", 1 << 20, data=b"\x22" * 4096)
    paths = new_vbd(xs, served)
    try:
        line = one_line(run("cli", "--sim-dir", xen.root_dir, "--backend-path", paths.backend, "--image", other),
                        "backend.params")
        assert served in line and other in line
        assert read(xs, f"{paths.backend}/state") == b"1"  # untouched
        server = Server(xen, paths.backend, "--image", os.path.join(str(tmp_path), ".", "served.img"))
        try:
            server.wait_state(xs, paths.backend, XenbusState.InitWait)
            fe = RawFrontend(xen.platform(1), paths.frontend, paths.backend, 0)
            try:
                fe.connect()
                assert fe.read(0, 4096)[1] == b"\x11" * 4096
                fe.disconnect()
            finally:
                fe.close()
        finally:
            assert server.stop() == 0, server.err
    finally:
        destroy_vbd(xs, paths)


# -- the report ------------------------------------------------------------------------------


def test_cli_serves_and_writes_the_report_on_sigterm(tmp_path, xen, xs) -> None:
    img = image(tmp_path, "disk.img", 1 << 20)
    paths = new_vbd(xs, img)
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
        destroy_vbd(xs, paths)
    assert out == ""  # stdout only when asked (--report -)
    with open(report) as f:
        written = json.load(f)
    mine = written["frontends"][paths.frontend]
    assert mine["violations"] == {"discard.secure_not_advertised": 1}
    assert mine["first"]["discard.secure_not_advertised"].startswith("discard.secure_not_advertised: request")
    assert mine["requests"]["by_operation"] == {
        "discard": {"bytes": 0, "direct": 0, "indirect": 0, "rejected": 1, "segments": 0},
        "read": {"bytes": 4096, "direct": 1, "indirect": 0, "rejected": 0, "segments": 1},
        "write": {"bytes": 4096, "direct": 1, "indirect": 0, "rejected": 0, "segments": 1},
    }
    assert mine["requests"]["checked"] == 3 and written["requests"] == 3 and written["total"] == 1
    assert mine["features"]["queues"] == 2 and mine["features"]["ring-page-order"] == 1
    assert mine["connects"] == 1 and mine["disconnects"] == 1 and "stop requested" in mine["ended"]
    assert written["ended"] == "stop requested"
    assert mine["rules_exercised"]["request.beyond_disk"] == 2
    assert mine["rules_exercised"]["discard.secure_not_advertised"] == 1


def test_a_frontend_that_never_connected_is_in_the_report_and_stdout_when_asked(tmp_path, xen, xs) -> None:
    paths = new_vbd(xs, image(tmp_path, "disk.img", 1 << 20))
    server = Server(xen, paths.backend, report="-")
    try:
        server.wait_state(xs, paths.backend, XenbusState.InitWait)
    finally:
        assert server.stop() == 0, server.err
        destroy_vbd(xs, paths)
    report = json.loads(server.out)
    assert report["frontends"] == {paths.frontend: report["frontends"][paths.frontend]}
    mine = report["frontends"][paths.frontend]
    assert mine["connects"] == 0 and mine["ended"] == "never connected" and mine["requests"]["checked"] == 0


def test_sigusr1_writes_the_report_and_a_late_sigterm_cannot_lose_it(tmp_path, xen, xs) -> None:
    paths = new_vbd(xs, image(tmp_path, "disk.img", 1 << 20))
    report = tmp_path / "report.json"
    server = Server(xen, paths.backend, report=str(report))
    try:
        server.wait_state(xs, paths.backend, XenbusState.InitWait)
        server.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not report.exists():
            assert time.monotonic() < deadline, "no report after SIGUSR1"
            time.sleep(0.05)
        assert server.proc.poll() is None
        report.unlink()
        # Signals in quick succession: the first stops, the others must not kill it unreported.
        for _ in range(3):
            server.proc.send_signal(signal.SIGTERM)
        assert server.stop() == 0, server.err
    finally:
        server.stop(signal.SIGKILL)
        destroy_vbd(xs, paths)
    assert json.loads(report.read_text())["frontends"][paths.frontend]["connects"] == 0


@pytest.mark.parametrize("value", [b"0", b"", b"9", b"banana"])
def test_a_malformed_frontend_state_is_counted_and_closes_the_device(tmp_path, xen, xs, value) -> None:
    paths = new_vbd(xs, image(tmp_path, "disk.img", 1 << 20))
    report = tmp_path / "report.json"
    server = Server(xen, paths.backend, report=str(report))
    fe = RawFrontend(xen.platform(1), paths.frontend, paths.backend, 0)
    try:
        fe.connect()
        fe.xs.write(f"{paths.frontend}/state", value)
        server.wait_state(xs, paths.backend, XenbusState.Closing)
        assert server.proc.poll() is None  # it waits for the frontend, as after any violation
        assert read(xs, f"{paths.backend}/error").startswith(b"22 ")
        # The frontend closes and starts again: the backend serves it, the old reason goes.
        fe.disconnect()
        fe.reconnect_ready()
        assert read(xs, f"{paths.backend}/error") is None
        fe.connect()
        assert fe.read(0, 512)[0].status == 0
        fe.disconnect()
        assert server.stop() == 0, server.err
    finally:
        server.stop(signal.SIGKILL)
        fe.close()
        destroy_vbd(xs, paths)
    mine = json.loads(report.read_text())["frontends"][paths.frontend]
    rules = {b"0": "state.unknown", b"": "state.malformed", b"9": "state.unknown", b"banana": "state.malformed"}
    assert mine["violations"] == {rules[value]: 1}, mine
    assert mine["connects"] == 2 and mine["disconnects"] == 2 and mine["requests"]["checked"] == 1
    assert mine["ended"] == "frontend went to Closed"
