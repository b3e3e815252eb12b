"""PV guests (domUs) and Linux's kernel blkback, driven by tests/xen/guests.py in dom0.

Owns: proof that the guest infrastructure other tests build on works on real Xen: a domU's
kernel blkfront reads what dom0 put on a kernel-blkback disk and dom0 reads what the guest
wrote ("disk-io"); a guest reads an MBR + ext2 image and then prints its login banner
("banner"); a guest that panics on purpose leaves the panic line in its console log and
ends crashed ("panic"); a dom0 self-attach reaches blkback's InitWait with the frontend
directory outside device/vbd/. After every test only Domain-0 is left, and every vbd, loop
device and blkback device is gone.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from guests import (
    BANNER,
    PANIC_LINE,
    SELF_FRONTEND_ROOT,
    Guest,
    GuestError,
    build_initramfs,
    guest_extra,
    guest_kernel,
    guest_lines,
    make_disk_image,
    pv_guest,
    self_attach_kernel_vbd,
    unique_name,
    write_pattern,
    xl_domains,
)

from xentools.core.vbd import encode_vbd
from xentools.tools.images.diskformat import inspect_image

MiB = 1 << 20
KiB = 1 << 10
# Under nested TCG a guest boots in ~6 s on an idle host, ~3x that on a busy one.
BOOT_TIMEOUT = 150.0


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def kernel():
    return guest_kernel()


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory, kernel) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("guest") / "initramfs.cpio", kernel=kernel)


@pytest.fixture
def xs(platform):
    client = platform.open_xenstore(timeout=30.0)
    yield client
    client.close()


def _blkback_devices() -> set[str]:
    return {p.name for p in Path("/sys/bus/xen-backend/devices").glob("vbd-*")}


@pytest.fixture(autouse=True)
def _nothing_left():
    # Compared with before the test, so that a leak is blamed on the test that made it.
    domains, devices = set(xl_domains()), _blkback_devices()
    yield
    assert set(xl_domains()) <= domains, f"a guest outlived its test: {xl_domains()}"
    assert _blkback_devices() <= devices, f"blkback still holds {sorted(_blkback_devices() - devices)}"


def loops_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout


def test_disk_io_guest_on_kernel_blkback(tmp_path, kernel, initramfs, xs):
    image = tmp_path / "disk.raw"
    size = 16 * MiB
    read_at, read_len = 4 * MiB, 256 * KiB
    write_at, write_len = 9 * MiB + 4 * KiB, 192 * KiB
    written_before = os.urandom(read_len)
    with open(image, "wb") as f:
        f.truncate(size)
        f.seek(read_at)
        f.write(written_before)
    token = f"xt{secrets.token_hex(6)}"
    pattern = write_pattern(token, write_len)
    extra = guest_extra("disk-io", read=(read_at, read_len), write=(write_at, write_len), token=token)
    cfg = pv_guest(unique_name("xt-diskio"), kernel.image, initramfs, extra)

    with Guest(cfg, tmp_path) as guest:
        vbd = guest.attach_kernel_vbd(xs, image)
        loop = os.stat(vbd.loop).st_rdev
        assert vbd.backend("physical-device") == f"{os.major(loop):x}:{os.minor(loop):x}"
        assert vbd.backend("dev") == "xvda"
        # Each side owns its directory and may read the other's.
        assert xs.get_perms(vbd.paths.backend) == ["n0", f"r{guest.domid}"]
        assert xs.get_perms(vbd.paths.frontend) == [f"n{guest.domid}", "r0"]
        guest.unpause()
        guest.wait_for("GUEST: done disk-io", timeout=BOOT_TIMEOUT)
        assert guest.wait_end() == "shutdown"  # poweroff -f, kept by on_poweroff=preserve
        lines = guest_lines(guest.console())
        # blkback wrote what it connected with: the loop device's size in sectors.
        assert vbd.backend("sectors") == str(size // 512)
        assert vbd.backend("feature-max-indirect-segments") is not None
    assert vbd.paths is None and vbd.loop is None
    assert loops_of(image) == ""
    assert guest.domid not in [domid for _, domid in xl_domains()]

    assert f"disk xvda {size} bytes" in lines
    assert f"read-sha256 {sha256(written_before)}" in lines
    assert f"wrote OK sha256 {sha256(pattern)}" in lines
    data = image.read_bytes()
    assert data[write_at : write_at + write_len] == pattern
    # Only the guest's region changed, not a byte either side of it.
    assert data[read_at : read_at + read_len] == written_before
    assert data[write_at - 4 * KiB : write_at] == bytes(4 * KiB)
    assert data[write_at + write_len : write_at + write_len + 4 * KiB] == bytes(4 * KiB)


def test_banner_guest_reads_its_disk_then_prints_the_banner(tmp_path, kernel, initramfs, xs):
    token = secrets.token_hex(8)
    motd = f"xentools test disk {token}\nread through xen-blkfront\n".encode()
    disk = make_disk_image(tmp_path / "banner.raw", {"motd": motd, "other": b"not read\n"})
    before = sha256(disk.path.read_bytes())
    # What `xentools image inspect` (issue 6) sees: a RAW image with one MBR partition.
    info = inspect_image(disk.path)
    assert (info.format, info.partition_table) == ("raw", "mbr")
    assert [(p.start_lba * 512, p.sectors * 512, p.type) for p in info.partitions] == [
        (disk.partition_offset, disk.partition_size, "0x83")
    ]
    cfg = pv_guest(unique_name("xt-banner"), kernel.image, initramfs, guest_extra("banner"))

    with Guest(cfg, tmp_path) as guest:
        guest.attach_kernel_vbd(xs, disk.path, mode="r")
        guest.unpause()
        banner = guest.wait_for(BANNER, timeout=BOOT_TIMEOUT)
        console = guest.console()
        # The guest waits at its prompt like a getty (then=wait): destroyed while running.
        assert guest.ended() is None
    assert console[banner.start() - 1] == "\n"  # the prompt starts a line, as a getty's does
    read_first = guest_lines(console[: banner.start()])
    assert "mounted /dev/xvda1 ext2" in read_first
    assert f"file motd sha256 {sha256(motd)}" in read_first
    assert f"text xentools test disk {token}" in read_first
    assert "text read through xen-blkfront" in read_first
    assert read_first[-1].startswith("done banner at ")
    assert not any(line.startswith("FAIL") for line in guest_lines(console))
    assert sha256(disk.path.read_bytes()) == before  # a read-only vbd, mounted ro
    assert guest.domid not in [domid for _, domid in xl_domains()]


def test_panic_guest_leaves_the_panic_line_and_ends_crashed(tmp_path, kernel, initramfs):
    cfg = pv_guest(unique_name("xt-panic"), kernel.image, initramfs, guest_extra("panic"))
    with Guest(cfg, tmp_path) as guest:
        guest.unpause()
        guest.wait_for(PANIC_LINE, timeout=BOOT_TIMEOUT)
        assert guest.wait_end() == "crashed"  # Linux's Xen panic notifier: SHUTDOWN_crash
        console = guest.console()
        assert console.index("GUEST: panicking on purpose") < console.index(PANIC_LINE)
        # A pattern that never comes fails fast once the guest has ended, with the console.
        with pytest.raises(GuestError, match=r"ended \(crashed\) without .*; console:\n  \| "):
            guest.wait_for("GUEST: done panic", timeout=60)
    assert guest.domid not in [domid for _, domid in xl_domains()]


def test_dom0_self_attach_reaches_initwait_outside_device_vbd(tmp_path, xs):
    image = tmp_path / "self.raw"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    with self_attach_kernel_vbd(xs, image) as vbd:
        assert vbd.paths.frontend == f"{SELF_FRONTEND_ROOT}/{encode_vbd('xvda')}"
        assert vbd.paths.backend == f"/local/domain/0/backend/vbd/0/{encode_vbd('xvda')}"
        assert vbd.wait_backend_state({2}, timeout=60) == 2  # InitWait: waiting for a frontend
        assert vbd.backend("sectors") is None  # not connected: no frontend spoke yet
        assert int(vbd.backend("feature-max-indirect-segments")) > 0
        # No kernel frontend claimed the directory: it is as the toolstack wrote it.
        assert xs.read(f"{vbd.paths.frontend}/state") == b"1"
        assert xs.get_perms(vbd.paths.frontend) == ["n0", "r0"]
        assert vbd.sysfs.exists()
        paths, sysfs = vbd.paths, vbd.sysfs
    assert not xs.exists(paths.backend) and not xs.exists(paths.frontend)
    assert not sysfs.exists()
    assert loops_of(image) == ""


def test_guest_parameters_are_single_safe_words(kernel, initramfs):
    # /init evals xentools.* names and reads values unquoted: guests.py lets through only
    # what it can carry, and a config xl would misread is refused before xl runs.
    assert guest_extra("disk-io", read=(0, 4096), token="a_b-1") == (
        "console=hvc0 quiet xentools.scenario=disk-io xentools.read=0+4096 xentools.token=a_b-1"
    )
    for bad in ({"token": "a b"}, {"token": "$(reboot)"}, {"token": ""}, {"Bad": "x"}):
        with pytest.raises(GuestError, match="guest parameter"):
            guest_extra("disk-io", **bad)
    with pytest.raises(GuestError, match="guest scenario"):
        guest_extra("disk io")
    with pytest.raises(GuestError, match="quote"):
        pv_guest("x", kernel.image, initramfs, 'console=hvc0 "')
    assert write_pattern("ab", 7) == b"ab\nab\na"
