"""`xentools vbd create|destroy` on real Xen, in dom0, against Xen's C xenstored.

Owns: proof that what `vbd create` checks in xenstore holds on real Xen as on the software
Xen: a domain that does not exist is refused (no /local/domain/N), an existing vbd is refused
without --force; each as one line and a non-zero exit, with nothing written to xenstore; a
disk spec and the old `--frontend-domid` spelling work. (The image checks do not depend on
the platform: tests/test_cli_vbd.py. Each CLI run costs ~15 s of dom0's slow Python.) The vbd made here is dom0's own (frontend domid 0) under the
userspace backend kind, which no kernel backend serves.
"""

from __future__ import annotations

import os
import subprocess
import sys

XENTOOLS = [sys.executable, "-m", "xentools"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "XENTOOLS_SIM_DIR"}
    return subprocess.run([*XENTOOLS, "vbd", *args], capture_output=True, text=True, timeout=120, env=env)


def _refused(proc: subprocess.CompletedProcess[str], rule: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(f"xentools: error: {rule}: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_vbd_create_checks_on_real_xen(tmp_path, platform):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    backend = "/local/domain/0/backend/xtvbd/0/51936"  # xvdo
    common = ("--userspace-kind", "--vdev", "xvdo")
    xs = platform.open_xenstore()
    try:
        _refused(_run("create", "--domid", "4000", *common, "--image", str(image)), "vbd.no_domain")
        assert not xs.exists("/local/domain/0/backend/xtvbd/4000")
        assert not xs.exists(backend)
        made = _run("create", "--frontend-domid", "0", *common, "--image", f"format=raw, access=ro, target={image}")
        assert made.returncode == 0, made.stderr
        try:
            assert xs.read(backend + "/params") == str(image).encode()
            assert xs.read(backend + "/mode") == b"r"
            _refused(_run("create", "--domid", "0", *common, "--image", str(image)), "vbd.exists")
        finally:
            gone = _run("destroy", "--domid", "0", *common)
            assert gone.returncode == 0, gone.stderr
        assert not xs.exists(backend)
    finally:
        xs.close()
