"""`python -m xentools image ...` as a user runs it: each kind of bad input gives one clear
line on stderr and the right exit code (1 for fetch/inspect, 4 for a boot test that cannot
run); a good fetch prints the image's path."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from test_images_support import FakeXl, MirrorServer, freebsd_like_image, release_dir, vhd_footer, xz
from xentools.tools.cli import cli as xentools_cli
from xentools.tools.images import fetch as fetch_mod

NAME = "FreeBSD-14.1-RELEASE-amd64-ufs.raw.xz"
IMG = bytes(freebsd_like_image(1 << 20))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["no_proxy"] = "*"
    env.update(extra)
    return env


def xentools(*args: str, env: dict[str, str] | None = None, cwd: str | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xentools", *args], capture_output=True, text=True,
                          env=env or clean_env(), cwd=cwd, timeout=60, check=False, **kw)


def one_error_line(p: subprocess.CompletedProcess, rule: str) -> str:
    """The error is one line, the last on stderr (progress labels may precede it)."""
    lines = p.stderr.splitlines()
    errors = [line for line in lines if line.startswith("xentools: error")]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr
    assert errors[0].startswith(f"xentools: error: {rule}: "), errors[0]
    assert "Traceback" not in p.stderr
    return errors[0]


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    release_dir(root, "14.1-RELEASE", {NAME: xz(IMG)})
    return root


def test_fetch_prints_the_raw_path(site, tmp_path):
    dest = tmp_path / "dest"
    p = xentools("image", "fetch", "14.1-RELEASE", "--mirror", site.as_uri(), "--dest", str(dest))
    assert p.returncode == 0, p.stderr
    raw = dest / "FreeBSD-14.1-RELEASE-amd64-ufs.raw"
    assert p.stdout == f"{raw}\n" and raw.read_bytes() == IMG
    assert "downloading " + NAME in p.stderr  # the progress bar's label (stderr is not a terminal)
    p = xentools("image", "fetch", "14.1", "--mirror", str(site), "--dest", str(dest), "--json")
    assert json.loads(p.stdout)["downloaded"] is False


def test_unknown_release(site, tmp_path):
    p = xentools("image", "fetch", "12.4", "--mirror", str(site), "--dest", str(tmp_path / "d"))
    assert p.returncode == 1 and p.stdout == ""
    assert "13.x/14.x/15.x" in one_error_line(p, "catalog.unknown_release")


def test_no_network_to_the_mirror(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = xentools("image", "fetch", "14.1", "--mirror", f"http://127.0.0.1:{port}/", "--dest", str(tmp_path / "d"))
    assert p.returncode == 1
    assert f"127.0.0.1:{port}" in one_error_line(p, "mirror.unreachable")


def test_checksum_mismatch_keeps_the_partial(tmp_path):
    root = tmp_path / "site"
    release_dir(root, "14.1-RELEASE", {NAME: xz(IMG)}, bad_digest_for=NAME)
    dest = tmp_path / "d"
    with MirrorServer(root) as srv:
        p = xentools("image", "fetch", "14.1", "--fs", "ufs", "--mirror", srv.url, "--dest", str(dest))
    assert p.returncode == 1
    line = one_error_line(p, "checksum.mismatch")
    assert NAME in line and "kept" in line
    assert (dest / (NAME + ".part")).exists() and not (dest / NAME).exists()


def test_disk_full_is_one_line(site, tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch_mod, "_write_all", full)
    r = CliRunner().invoke(xentools_cli, ["image", "fetch", "14.1", "--mirror", str(site), "--dest", str(tmp_path / "d")])
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1].startswith("xentools: error: storage.full: disk full while downloading to ")
    assert len([line for line in r.stderr.splitlines() if line.startswith("xentools: error")]) == 1


def test_inspect_recognises_a_vhd(tmp_path):
    vhd = tmp_path / "FreeBSD.vhd"
    vhd.write_bytes(IMG + vhd_footer(len(IMG)))
    p = xentools("image", "inspect", str(vhd))
    assert p.returncode == 0 and p.stderr == ""
    assert f"{vhd}: VHD (fixed, footer at the end)" in p.stdout
    assert f"qemu-img convert -f vpc -O raw {vhd} {tmp_path / 'FreeBSD.raw'}" in p.stdout
    data = json.loads(xentools("image", "inspect", "--json", str(vhd)).stdout)
    assert data["format"] == "vhd" and data["bootable_as_raw"] is False


def test_inspect_raw_and_missing(tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(IMG)
    p = xentools("image", "inspect", str(raw))
    assert p.returncode == 0 and "GPT partitions" in p.stdout and "FreeBSD UFS" in p.stdout
    p = xentools("image", "inspect", str(tmp_path / "missing.raw"))
    assert p.returncode == 1
    one_error_line(p, "image.missing")


def test_boot_test_refuses_a_vhd_with_the_conversion_command(tmp_path):
    vhd = tmp_path / "img.vhd"
    vhd.write_bytes(IMG + vhd_footer(len(IMG)))
    p = xentools("image", "boot-test", str(vhd))
    assert p.returncode == 4 and p.stdout == ""
    line = one_error_line(p, "image.not_raw")
    assert f"qemu-img convert -f vpc -O raw {vhd} {tmp_path / 'img.raw'}" in line


def test_boot_test_without_xl(tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(IMG)
    empty = tmp_path / "emptybin"
    empty.mkdir()
    p = xentools("image", "boot-test", str(raw), env=clean_env(PATH=str(empty)))
    assert p.returncode == 4
    assert "xen-utils" in one_error_line(p, "boottest.no_xl")


def _drop_root() -> None:
    # A new user namespace without a uid map: the process's euid reads as the overflow uid
    # (65534) while file access still works, so the interpreter under /root stays usable.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER) failed: user namespaces are needed here")


def test_boot_test_not_root(tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(IMG)
    fake = FakeXl(tmp_path)
    env = clean_env(PATH=f"{fake.bin}{os.pathsep}{os.environ.get('PATH', '')}", FAKE_XL_STATE=str(fake.state))
    # As root, run the command in a user namespace where it is not root; otherwise as is.
    p = xentools("image", "boot-test", str(raw), env=env, preexec_fn=_drop_root if os.geteuid() == 0 else None)
    assert p.returncode == 4, p.stderr
    assert "sudo" in one_error_line(p, "boottest.not_root")
    assert fake.calls() == []  # nothing ran


def test_boot_test_not_root_in_process(tmp_path, monkeypatch):
    raw = tmp_path / "d.raw"
    raw.write_bytes(IMG)
    fake = FakeXl(tmp_path)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    r = CliRunner().invoke(xentools_cli, ["image", "boot-test", str(raw), "--xl", str(fake.path)])
    assert r.exit_code == 4 and r.stdout == ""
    assert r.stderr.startswith("xentools: error: boottest.not_root: ") and r.stderr.count("\n") == 1


def test_boot_test_bad_option_is_a_usage_error(tmp_path):
    p = xentools("image", "boot-test", str(tmp_path / "x.raw"), "--backend", "qemu")
    assert p.returncode == 2 and "Invalid value for '--backend'" in p.stderr
