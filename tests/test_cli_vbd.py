"""`xentools vbd create|destroy` on the software Xen: both directories, one transaction."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xentools.platform.sim.launcher import SoftwareXen


@pytest.fixture(scope="module")
def xen():
    with SoftwareXen(domains=(0, 4)) as sim:
        yield sim


def _run(xen, *args):
    return subprocess.run([sys.executable, "-m", "xentools", "vbd", *args,
                           "--sim-dir", xen.root_dir], capture_output=True, text=True, timeout=60)


def test_create_then_destroy(xen, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    made = _run(xen, "create", "--frontend-domid", "4", "--vdev", "xvdb", "--image", str(image),
                "--read-only", "--json")
    assert made.returncode == 0, made.stderr
    paths = json.loads(made.stdout)
    assert paths == {"backend": "/local/domain/0/backend/vbd/4/51728",
                     "frontend": "/local/domain/4/device/vbd/51728"}
    xs = xen.platform(0).open_xenstore()
    try:
        assert xs.read(paths["backend"] + "/mode") == b"r"
        assert xs.read(paths["backend"] + "/params") == str(image).encode()
        assert xs.read(paths["frontend"] + "/backend") == paths["backend"].encode()
        assert xs.get_perms(paths["frontend"]) == ["n4", "r0"]
        gone = _run(xen, "destroy", "--frontend-domid", "4", "--vdev", "xvdb")
        assert gone.returncode == 0, gone.stderr
        assert not xs.exists(paths["backend"]) and not xs.exists(paths["frontend"])
    finally:
        xs.close()


def test_bad_vdev_is_one_line(xen, tmp_path):
    bad = _run(xen, "create", "--frontend-domid", "4", "--vdev", "floppy", "--image", "x")
    assert bad.returncode == 1
    assert bad.stderr.startswith("xentools: error: vbd.") and bad.stderr.count("\n") == 1
