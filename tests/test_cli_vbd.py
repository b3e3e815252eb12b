"""`xentools vbd create|destroy` on the software Xen: both directories, one transaction."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import pytest



XEN_DOMAINS = (0, 4)  # the module's software Xen (the xen fixture, tests/conftest.py)


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


# -- what `vbd create` refuses (issue 9, item 4), each as one line with the fix ------------------


def _xs(xen):
    return xen.platform(0).open_xenstore()


def _image(tmp_path, name="disk.img", size=1 << 20):
    path = tmp_path / name
    path.write_bytes(bytes(size))
    return path


def _refused(result, rule, *words):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"xentools: error: {rule}: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def _backend(devid, fe=4):
    return f"/local/domain/0/backend/vbd/{fe}/{devid}"


def test_missing_image_is_refused_and_nothing_written(xen, tmp_path):
    bad = _run(xen, "create", "--domid", "4", "--vdev", "xvdc", "--image", str(tmp_path / "nope.img"))
    _refused(bad, "vbd.image_missing", "truncate -s")
    with _xs(xen) as xs:
        assert not xs.exists(_backend(51744)) and not xs.exists("/local/domain/4/device/vbd/51744")


@pytest.mark.parametrize("name,content,fmt", [
    ("disk.qcow2", b"QFI\xfb" + bytes([0, 0, 0, 3]) + bytes(16) + (1 << 20).to_bytes(8, "big") + bytes(4000), "qcow2"),
    ("disk.vmdk", b"KDMV" + bytes(4092), "vmdk"),
])
def test_non_raw_image_is_refused_with_the_conversion(xen, tmp_path, name, content, fmt):
    path = tmp_path / name
    path.write_bytes(content)
    bad = _run(xen, "create", "--domid", "4", "--vdev", "xvdd", "--image", str(path))
    _refused(bad, "image.not_raw", f"qemu-img convert -f {fmt} -O raw")
    with _xs(xen) as xs:
        assert not xs.exists(_backend(51760))


def test_vhd_image_is_refused(xen, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_images_support import vhd_footer

    path = tmp_path / "disk.vhd"
    path.write_bytes(bytes(1 << 20) + vhd_footer(1 << 20))
    _refused(_run(xen, "create", "--domid", "4", "--vdev", "xvdd", "--image", str(path)),
             "image.not_raw", "qemu-img convert -f vpc -O raw")


def test_missing_frontend_domain_is_refused(xen, tmp_path):
    image = _image(tmp_path)
    bad = _run(xen, "create", "--domid", "9", "--vdev", "xvda", "--image", str(image))
    _refused(bad, "vbd.no_domain", "domain 9 does not exist")
    with _xs(xen) as xs:
        assert not xs.exists("/local/domain/0/backend/vbd/9")
        xs.write("/local/domain/7/name", "ghost")  # a directory alone does not make a domain
    _refused(_run(xen, "create", "--domid", "7", "--image", str(image)), "vbd.no_domain", "not introduced")


def test_existing_vbd_needs_force_and_a_served_one_is_never_replaced(xen, tmp_path):
    first, second = _image(tmp_path, "a.img"), _image(tmp_path, "b.img")
    made = _run(xen, "create", "--domid", "4", "--vdev", "xvde", "--image", str(first))
    assert made.returncode == 0, made.stderr
    backend = _backend(51776)
    again = _run(xen, "create", "--domid", "4", "--vdev", "xvde", "--image", str(second))
    _refused(again, "vbd.exists", "--force", "xentools vbd destroy --domid 4 --vdev xvde")
    with _xs(xen) as xs:
        assert xs.read(backend + "/params") == str(first).encode()
    forced = _run(xen, "create", "--domid", "4", "--vdev", "xvde", "--image", str(second), "--force")
    assert forced.returncode == 0, forced.stderr
    with _xs(xen) as xs:
        assert xs.read(backend + "/params") == str(second).encode()
        xs.write(backend + "/state", "4")  # a backend serves it now (Connected)
        xs.write(backend + "/sectors", "2048")  # a key the backend wrote
    for state in ("4", "2", "5"):
        with _xs(xen) as xs:
            xs.write(backend + "/state", state)
        busy = _run(xen, "create", "--domid", "4", "--vdev", "xvde", "--image", str(first), "--force")
        _refused(busy, "vbd.in_use", "stop its backend")
        with _xs(xen) as xs:
            assert xs.read(backend + "/params") == str(second).encode()
            assert xs.read(backend + "/sectors") == b"2048"
    with _xs(xen) as xs:
        xs.write(backend + "/state", "6")  # Closed: the backend let go
    assert _run(xen, "create", "--domid", "4", "--vdev", "xvde", "--image", str(first), "--force").returncode == 0
    with _xs(xen) as xs:
        assert not xs.exists(backend + "/sectors")  # replaced, not written over
    _run(xen, "destroy", "--domid", "4", "--vdev", "xvde")


def test_disk_spec_is_parsed_not_stored_as_a_path(xen, tmp_path, monkeypatch):
    image = _image(tmp_path)
    spec = f"format=raw, vdev=xvdf, access=ro, target={image}"
    made = _run(xen, "create", "--domid", "4", "--image", spec, "--json")
    assert made.returncode == 0, made.stderr
    paths = json.loads(made.stdout)
    assert paths["backend"] == _backend(51792)
    with _xs(xen) as xs:
        assert xs.read(paths["backend"] + "/params") == str(image).encode()
        assert xs.read(paths["backend"] + "/mode") == b"r"
    _run(xen, "destroy", "--domid", "4", "--vdev", "xvdf")
    # positional form, relative target resolved against the working directory
    made = subprocess.run([sys.executable, "-m", "xentools", "vbd", "create", "--sim-dir", xen.root_dir,
                           "--domid", "4", "--image", "disk.img,raw,xvdg,rw"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    with _xs(xen) as xs:
        assert xs.read(_backend(51808) + "/params") == str(image).encode()
        assert xs.read(_backend(51808) + "/mode") == b"w"
    _run(xen, "destroy", "--domid", "4", "--vdev", "xvdg")


@pytest.mark.parametrize("spec,rule,words", [
    ("format=raw, colour=red, target={img}", "diskspec.unknown_key", ["'colour'"]),
    ("format=vhd, vdev=xvdh, target={img}", "diskspec.format", ["qemu-img convert"]),
    ("access=rwx, target={img}", "diskspec.bad_access", ["r, ro, w, rw"]),
    ("vdev=xvdb, target={img}", "diskspec.conflict", ["--vdev xvdh"]),
    ("script=block-iscsi, target={img}", "diskspec.unsupported", ["script"]),
    ("format=raw, vdev=xvdh", "diskspec.no_target", ["target="]),
])
def test_bad_disk_specs_are_one_line(xen, tmp_path, spec, rule, words):
    image = _image(tmp_path)
    bad = _run(xen, "create", "--domid", "4", "--vdev", "xvdh", "--image", spec.format(img=image))
    _refused(bad, rule, *words)
    with _xs(xen) as xs:
        assert not xs.exists(_backend(51824))


def test_image_writable_twice_needs_w_bang(xen, tmp_path):
    image = _image(tmp_path)
    assert _run(xen, "create", "--domid", "4", "--vdev", "xvdi", "--image", str(image)).returncode == 0
    twice = _run(xen, "create", "--domid", "4", "--vdev", "xvdj", "--image", str(image))
    _refused(twice, "vbd.image_shared", "access=w!", _backend(51840))
    shared = _run(xen, "create", "--domid", "4", "--image", f"vdev=xvdj, access=w!, target={image}")
    assert shared.returncode == 0, shared.stderr
    for vdev in ("xvdi", "xvdj"):
        _run(xen, "destroy", "--domid", "4", "--vdev", vdev)


def test_one_spelling_old_ones_hidden(xen, tmp_path):
    image = _image(tmp_path)
    old = _run(xen, "create", "--frontend-domid", "4", "--vdev", "xvdk", "--image", str(image))
    assert old.returncode == 0, old.stderr
    _run(xen, "destroy", "--domid", "4", "--vdev", "xvdk")
    shown = subprocess.run([sys.executable, "-m", "xentools", "vbd", "create", "--help"],
                           capture_output=True, text=True, timeout=60).stdout
    assert "--domid" in shown and "--frontend-domid" not in shown and "--sim-dir" in shown


def test_destroying_a_missing_vbd_says_so(xen):
    _refused(_run(xen, "destroy", "--domid", "4", "--vdev", "xvdz"), "vbd.missing", "nothing to remove")
