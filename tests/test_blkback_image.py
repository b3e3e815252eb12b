"""blkback_image: opening RAW images (every bad-input rule), vectored I/O, flush and hole
punching."""

from __future__ import annotations

import os

import pytest

from xentools.devices.blkback_image import IOV_MAX, ImageError, open_image


def make(path, size: int, mode: int = 0o644) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize(
    "setup,kwargs,rule",
    [
        (lambda d: str(d / "absent.img"), {}, "image.missing"),
        (lambda d: str(d), {}, "image.not_a_file"),
        (lambda d: make(d / "empty.img", 0), {}, "image.empty"),
        (lambda d: make(d / "odd.img", 1000), {}, "image.size"),
        (lambda d: make(d / "a512.img", 512 * 3), {"sector_size": 4096}, "image.size"),
        (lambda d: make(d / "ro.img", 4096, 0o444), {}, "image.read_only"),
        (lambda d: make(d / "ok.img", 4096), {"sector_size": 3000}, "image.sector_size"),
    ],
    ids=["missing", "directory", "empty", "not-512", "not-sector-size", "read-only-file", "bad-sector-size"],
)
def test_bad_images(tmp_path, setup, kwargs, rule) -> None:
    path = setup(tmp_path)
    with pytest.raises(ImageError) as info:
        open_image(path, **kwargs)
    assert info.value.rule == rule
    assert str(info.value).startswith(rule + ": ") and "\n" not in str(info.value)


def test_read_only_file_may_be_served_read_only(tmp_path) -> None:
    path = make(tmp_path / "ro.img", 8192, 0o444)
    with open_image(path, read_only=True) as image:
        assert image.read_only and image.size == 8192 and not image.can_punch_holes()


def test_vectored_io_round_trip_and_many_buffers(tmp_path) -> None:
    path = make(tmp_path / "disk.img", 1 << 20)
    with open_image(path) as image:
        data = os.urandom(512 * (IOV_MAX + 10))  # more buffers than one syscall takes
        views = [memoryview(data)[i : i + 512] for i in range(0, len(data), 512)]
        image.writev(views, 4096)
        out = bytearray(len(data))
        outs = [memoryview(out)[i : i + 512] for i in range(0, len(out), 512)]
        image.readv(outs, 4096)
        assert bytes(out) == data
        image.flush()
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(len(data)) == data


def test_punch_hole_reads_back_zero_and_frees_blocks(tmp_path) -> None:
    path = make(tmp_path / "disk.img", 1 << 20)
    with open_image(path) as image:
        if not image.can_punch_holes():
            pytest.fail("the test filesystem cannot punch holes")
        image.writev([memoryview(b"\xaa" * (1 << 20))], 0)
        image.flush()
        before = os.stat(path).st_blocks
        image.punch_hole(256 * 1024, 512 * 1024)
        after = os.stat(path).st_blocks
        assert after < before
        assert os.lseek(image.fd, 256 * 1024, os.SEEK_HOLE) == 256 * 1024
        buf = bytearray(1 << 20)
        image.readv([memoryview(buf)], 0)
        assert buf[: 256 * 1024] == b"\xaa" * (256 * 1024)
        assert buf[256 * 1024 : 768 * 1024] == bytes(512 * 1024)
        assert buf[768 * 1024 :] == b"\xaa" * (256 * 1024)
        assert os.stat(path).st_size == 1 << 20  # FALLOC_FL_KEEP_SIZE


def test_serving_reads_leaves_the_access_time_alone(tmp_path, monkeypatch):
    """The image is opened O_NOATIME (as Linux's blkback reads leave atime alone): reads do not
    move an access time that relatime would have moved; where O_NOATIME is refused (not the
    file's owner: EPERM), the image opens without it."""
    path = tmp_path / "atime.img"
    path.write_bytes(os.urandom(8192))
    old = os.stat(path).st_mtime - 3 * 86400  # older than a day and than mtime: relatime moves it
    os.utime(path, (old, os.stat(path).st_mtime))
    with open_image(str(path), read_only=True) as image:
        buf = bytearray(4096)
        image.readv([memoryview(buf)], 4096)
        assert os.stat(path).st_atime == old
    assert bytes(buf) == path.read_bytes()[4096:]
    real_open = os.open

    def refuse_noatime(p, flags, *args):  # type: ignore[no-untyped-def]
        if flags & os.O_NOATIME:
            raise PermissionError(1, "Operation not permitted")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", refuse_noatime)
    with open_image(str(path), read_only=True) as image:
        assert image.size == 8192
