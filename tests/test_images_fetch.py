"""Fetching a release image from a mirror: a local HTTP server (127.0.0.1 only) serving a
release directory with a small .raw.xz and its checksum files, and file:// and plain-dir
mirrors. Download, resume, verify, decompress, cache, and each failure's message."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import lzma
import os
import random
import socket
from pathlib import Path

import pytest

from test_images_support import MirrorServer, freebsd_like_image, mbr_image, release_dir, xz
from xentools.tools.images import fetch as fetch_mod
from xentools.tools.images.catalog import load_catalog
from xentools.tools.images.diskformat import inspect_image
from xentools.tools.images.errors import CatalogError, ChecksumError, ImageFormatError, MirrorError, StorageError
from xentools.tools.images.fetch import Mirror, decompress_xz, fetch_image

CATALOG = load_catalog(Path(__file__).resolve().parents[1] / "vm-images" / "catalog.toml")
FAM = CATALOG.family("freebsd")
MiB = 1 << 20



def with_content(img: bytearray, lba: int, seed: int, size: int = 96 * 1024) -> bytearray:
    """Incompressible bytes in a partition, so that the .xz is large enough to cut."""
    start = lba * 512 + 512
    img[start:start + size] = random.Random(seed).randbytes(size)
    return img


IMG_PLAIN = with_content(freebsd_like_image(3 * MiB), 4264, 1)
IMG_UFS = with_content(freebsd_like_image(2 * MiB), 4264, 2)
IMG_ZFS = with_content(mbr_image(2 * MiB, [(0xA5, 2048, 2000, True)]), 2048, 3)
NAMES = {
    "FreeBSD-14.1-RELEASE-amd64.raw.xz": xz(IMG_PLAIN),
    "FreeBSD-14.1-RELEASE-amd64-ufs.raw.xz": xz(IMG_UFS),
    "FreeBSD-14.1-RELEASE-amd64-zfs.raw.xz": xz(IMG_ZFS),
    "FreeBSD-14.1-RELEASE-amd64.vhd.xz": xz(b"not used"),
}
ZFS = "FreeBSD-14.1-RELEASE-amd64-zfs.raw.xz"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    # A proxy from the environment must not see the loopback mirror.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    release_dir(root, "14.1-RELEASE", NAMES)
    return root


@pytest.fixture
def server(site):
    with MirrorServer(site) as srv:
        yield srv


def do_fetch(mirror, dest, release="14.1", fs=None, **kw):
    ref = FAM.ref(release, "amd64", fs)
    kw.setdefault("backoff", 0.0)
    return fetch_image(ref, mirror, dest, profile=FAM.profile_name(ref.release), **kw)


def image_gets(server, name=ZFS):
    return [rng for path, rng in server.requests if path.endswith(name)]


def test_fetch_over_http_verifies_and_decompresses(server, tmp_path):
    dest = tmp_path / "dest"
    bars = []

    class Bar:
        def __init__(self, label, total):
            self.label, self.total, self.done = label, total, 0

        def __enter__(self):
            bars.append(self)
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.done += n

    res = do_fetch(Mirror.parse(server.url), dest, fs="zfs", progress=Bar)
    raw = dest / "FreeBSD-14.1-RELEASE-amd64-zfs.raw"
    assert res.raw_path == str(raw) and raw.read_bytes() == bytes(IMG_ZFS)
    assert res.downloaded and res.decompressed and res.fs == "zfs" and res.release == "14.1-RELEASE"
    assert res.algorithm == "sha512" and res.digest == hashlib.sha512(NAMES[ZFS]).hexdigest()
    assert res.url == server.url + "releases/VM-IMAGES/14.1-RELEASE/amd64/Latest/" + ZFS
    assert res.profile == "freebsd" and res.raw_size == len(IMG_ZFS)
    assert (dest / ZFS).read_bytes() == NAMES[ZFS]  # the verified .xz is the cache
    assert not (dest / (ZFS + ".part")).exists()
    assert inspect_image(raw).partition_table == "mbr"
    assert [(b.label.split()[0], b.total, b.done) for b in bars] == [
        ("downloading", len(NAMES[ZFS]), len(NAMES[ZFS])),
        ("verifying", len(NAMES[ZFS]), len(NAMES[ZFS])),
        ("decompressing", len(NAMES[ZFS]), len(NAMES[ZFS]))]
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_default_fs_is_the_unsuffixed_image(server, tmp_path):
    res = do_fetch(Mirror.parse(server.url), tmp_path / "d")
    assert Path(res.raw_path).name == "FreeBSD-14.1-RELEASE-amd64.raw"
    assert Path(res.raw_path).read_bytes() == bytes(IMG_PLAIN) and res.fs == "ufs"


def test_second_fetch_is_served_from_the_cache(server, tmp_path):
    dest = tmp_path / "dest"
    do_fetch(Mirror.parse(server.url), dest, fs="zfs")
    notices = []
    res = do_fetch(Mirror.parse(server.url), dest, fs="zfs", notice=notices.append)
    assert not res.downloaded and not res.decompressed
    assert len(image_gets(server)) == 1  # only the checksum file was read again
    assert any("cached" in n for n in notices)


def test_fresh_decompresses_again_without_downloading(server, tmp_path):
    dest = tmp_path / "dest"
    res = do_fetch(Mirror.parse(server.url), dest, fs="zfs")
    Path(res.raw_path).write_bytes(b"a guest wrote here" + bytes(len(IMG_ZFS) - 18))
    res2 = do_fetch(Mirror.parse(server.url), dest, fs="zfs", fresh=True)
    assert res2.decompressed and not res2.downloaded
    assert Path(res2.raw_path).read_bytes() == bytes(IMG_ZFS)
    assert len(image_gets(server)) == 1


def test_interrupted_download_is_kept_and_resumed_by_the_next_run(server, tmp_path):
    dest = tmp_path / "dest"
    assert len(NAMES[ZFS]) > 90000
    server.drop_first[ZFS] = 1000
    with pytest.raises(MirrorError) as err:
        do_fetch(Mirror.parse(server.url), dest, fs="zfs", retries=0)
    assert err.value.rule == "mirror.interrupted"
    part = dest / (ZFS + ".part")
    assert f"stopped at 1000 of {len(NAMES[ZFS])} bytes" in str(err.value) and str(part) in str(err.value)
    assert part.stat().st_size == 1000
    assert not (dest / ZFS).exists() and not (dest / "FreeBSD-14.1-RELEASE-amd64-zfs.raw").exists()
    res = do_fetch(Mirror.parse(server.url), dest, fs="zfs", retries=0)
    assert image_gets(server) == [None, "bytes=1000-"]
    assert Path(res.raw_path).read_bytes() == bytes(IMG_ZFS) and not part.exists()


def test_interrupted_download_is_resumed_within_one_run(server, tmp_path):
    server.drop_first[ZFS] = 777
    notices = []
    res = do_fetch(Mirror.parse(server.url), tmp_path / "d", fs="zfs", retries=2, notice=notices.append)
    assert image_gets(server) == [None, "bytes=777-"]
    assert Path(res.raw_path).read_bytes() == bytes(IMG_ZFS)
    assert any("resuming, attempt 1 of 2" in n for n in notices)


def test_server_without_range_support_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / (ZFS + ".part")).write_bytes(NAMES[ZFS][:500])
    server.ignore_range = True
    notices = []
    res = do_fetch(Mirror.parse(server.url), dest, fs="zfs", notice=notices.append)
    assert Path(res.raw_path).read_bytes() == bytes(IMG_ZFS)
    assert any("from the start" in n for n in notices)


def test_corrupted_file_fails_and_the_partial_is_never_taken_as_complete(site, server, tmp_path):
    latest = site / "releases/VM-IMAGES/14.1-RELEASE/amd64/Latest"
    blob = bytearray(NAMES[ZFS])
    blob[100] ^= 0xFF
    (latest / ZFS).write_bytes(bytes(blob))
    dest = tmp_path / "d"
    for _ in range(2):  # the second run must not take the full-length .part for a good file
        with pytest.raises(ChecksumError) as err:
            do_fetch(Mirror.parse(server.url), dest, fs="zfs")
        assert err.value.rule == "checksum.mismatch"
        assert ZFS in str(err.value) and "kept" in str(err.value) and "\n" not in str(err.value)
        assert (dest / (ZFS + ".part")).exists()
        assert not (dest / ZFS).exists() and not (dest / "FreeBSD-14.1-RELEASE-amd64-zfs.raw").exists()
    assert image_gets(server) == [None, f"bytes={len(blob)}-"]


def test_corrected_checksum_file_accepts_the_kept_partial_without_downloading(tmp_path):
    root = tmp_path / "site"
    release_dir(root, "14.1-RELEASE", {ZFS: NAMES[ZFS]}, bad_digest_for=ZFS)
    dest = tmp_path / "d"
    with MirrorServer(root) as srv:
        with pytest.raises(ChecksumError) as err:
            do_fetch(Mirror.parse(srv.url), dest, fs="zfs")
        assert "CHECKSUM.SHA512" in str(err.value)
        release_dir(root, "14.1-RELEASE", {ZFS: NAMES[ZFS]})  # the mirror fixed its checksum file
        res = do_fetch(Mirror.parse(srv.url), dest, fs="zfs")
        assert Path(res.raw_path).read_bytes() == bytes(IMG_ZFS)
        assert image_gets(srv) == [None, f"bytes={len(NAMES[ZFS])}-"]  # answered 416: nothing re-sent


def test_sha256_only_release(tmp_path):
    root = tmp_path / "site"
    release_dir(root, "13.4-RELEASE", {"FreeBSD-13.4-RELEASE-amd64.raw.xz": xz(IMG_UFS)}, sha512=False)
    with MirrorServer(root) as srv:
        res = do_fetch(Mirror.parse(srv.url), tmp_path / "d", release="13.4")
    assert res.algorithm == "sha256" and res.profile == "freebsd-13"
    assert Path(res.raw_path).read_bytes() == bytes(IMG_UFS)


def test_release_missing_from_the_mirror(server, tmp_path):
    with pytest.raises(MirrorError) as err:
        do_fetch(Mirror.parse(server.url), tmp_path / "d", release="15.0")
    assert err.value.rule == "mirror.no_release"
    assert "15.0-RELEASE" in str(err.value) and "CHECKSUM.SHA512 or CHECKSUM.SHA256" in str(err.value)


def test_no_network_to_the_mirror(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(MirrorError) as err:
        do_fetch(Mirror.parse(f"http://127.0.0.1:{port}/pub"), tmp_path / "d")
    assert err.value.rule == "mirror.unreachable"
    assert f"127.0.0.1:{port}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_file_url_and_plain_directory_mirrors(site, tmp_path, kind):
    text = site.as_uri() if kind == "file" else str(site)
    mirror = Mirror.parse(text)
    assert mirror.local
    res = do_fetch(mirror, tmp_path / "d", fs="ufs")
    assert Path(res.raw_path).name == "FreeBSD-14.1-RELEASE-amd64-ufs.raw"
    assert Path(res.raw_path).read_bytes() == bytes(IMG_UFS)


def test_local_mirror_resumes_a_partial_file(site, tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / (ZFS + ".part")).write_bytes(NAMES[ZFS][:300])
    res = do_fetch(Mirror.parse(str(site)), dest, fs="zfs")
    assert Path(res.raw_path).read_bytes() == bytes(IMG_ZFS)


@pytest.mark.parametrize("text, rule", [
    ("ftp://ftp.freebsd.org/pub/FreeBSD/", "mirror.url"),
    ("http:///no-host", "mirror.url"),
    ("file://otherhost/srv", "mirror.url"),
    ("/nonexistent/mirror/dir", "mirror.not_found"),
])
def test_bad_mirrors(text, rule):
    with pytest.raises(MirrorError) as err:
        Mirror.parse(text)
    assert err.value.rule == rule


def test_disk_full_while_downloading_keeps_the_partial(server, tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch_mod, "_write_all", full)
    dest = tmp_path / "d"
    with pytest.raises(StorageError) as err:
        do_fetch(Mirror.parse(server.url), dest, fs="zfs")
    assert err.value.rule == "storage.full" and "disk full" in str(err.value)
    assert (dest / (ZFS + ".part")).exists() and not (dest / ZFS).exists()


def test_disk_full_while_decompressing_leaves_no_half_image(server, tmp_path, monkeypatch):
    dest = tmp_path / "d"
    res = do_fetch(Mirror.parse(server.url), dest, fs="zfs")
    Path(res.raw_path).unlink()
    calls = []

    def full_after_one(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.write(fd, data)

    monkeypatch.setattr(fetch_mod, "_write_all", full_after_one)
    with pytest.raises(StorageError) as err:
        do_fetch(Mirror.parse(server.url), dest, fs="zfs")
    assert err.value.rule == "storage.full"
    assert sorted(p.name for p in dest.iterdir()) == [ZFS]  # the verified .xz stays; nothing else


def test_a_second_fetch_of_the_same_file_is_refused_while_one_runs(server, tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    with open(dest / (ZFS + ".part"), "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(StorageError) as err:
            do_fetch(Mirror.parse(server.url), dest, fs="zfs")
    assert err.value.rule == "storage.busy"


# ----------------------------------------------------------------------- decompression

def test_decompress_multi_stream_with_padding_and_trailing_zero_blocks(tmp_path):
    a, b = b"A" * 100000, bytes(300000) + b"tail" + bytes(200000)
    src = tmp_path / "x.xz"
    src.write_bytes(xz(a) + bytes(8) + xz(b))
    size = decompress_xz(src, tmp_path / "x.raw")
    assert size == len(a) + len(b)
    assert (tmp_path / "x.raw").read_bytes() == a + b


def test_decompress_truncated_and_garbage(tmp_path):
    src = tmp_path / "t.xz"
    src.write_bytes(xz(os.urandom(50000))[:-40])
    with pytest.raises(ImageFormatError) as err:
        decompress_xz(src, tmp_path / "t.raw")
    assert err.value.rule in ("xz.truncated", "xz.corrupt")
    src.write_bytes(b"definitely not xz" * 10)
    with pytest.raises(ImageFormatError) as err:
        decompress_xz(src, tmp_path / "t.raw")
    assert err.value.rule == "xz.corrupt"
    assert not (tmp_path / "t.raw").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["t.xz"]


def test_decompress_matches_lzma_for_a_large_sparse_image(tmp_path):
    img = bytes(freebsd_like_image(8 * MiB))
    src = tmp_path / "big.raw.xz"
    src.write_bytes(xz(img))
    decompress_xz(src, tmp_path / "big.raw")
    assert (tmp_path / "big.raw").read_bytes() == lzma.decompress(src.read_bytes()) == img


def test_a_catalog_pattern_that_matches_an_uncompressed_name_is_refused(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "vm-images" / "catalog.toml").read_text()
    path = tmp_path / "catalog.toml"
    path.write_text(text.replace(r"\.raw\.xz$", r"\.raw$"))
    fam = load_catalog(path).family()
    root = tmp_path / "site"
    release_dir(root, "14.1-RELEASE", {"FreeBSD-14.1-RELEASE-amd64.raw": bytes(IMG_UFS)})
    with pytest.raises(CatalogError) as err:
        fetch_image(fam.ref("14.1"), Mirror.parse(str(root)), tmp_path / "d", profile="freebsd")
    assert err.value.rule == "catalog.not_xz"
