"""Image format detection: RAW with MBR/GPT, VHD (footer at the end or the start), qcow2,
vmdk, VHDX, xz, unknown; and the refusal to boot a non-RAW image as RAW."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_images_support import (
    EFI_SYSTEM,
    FREEBSD_BOOT,
    FREEBSD_SWAP,
    FREEBSD_UFS,
    LINUX_FS,
    freebsd_like_image,
    gpt_image,
    mbr_image,
    vhd_footer,
    xz,
)
from xentools.tools.images.diskformat import identify, inspect_image, parse_vhd_footer, require_raw
from xentools.tools.images.errors import ImageFormatError

MiB = 1 << 20


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def test_freebsd_like_gpt_image_lists_its_partitions(tmp_path):
    info = inspect_image(write(tmp_path, "fbsd.raw", freebsd_like_image(4 * MiB)))
    assert info.format == "raw" and info.is_raw
    assert info.partition_table == "gpt" and info.sector_size == 512
    assert [(p.index, p.type_name, p.name) for p in info.partitions] == [
        (1, "FreeBSD boot", "gptboot0"), (2, "EFI system", "efiesp"),
        (3, "FreeBSD swap", "swapfs"), (4, "FreeBSD UFS", "rootfs")]
    assert info.partitions[3].start_lba == 4264
    assert info.partitions[3].sectors == (4 * MiB // 512 - 34) - 4264 + 1
    assert info.notes == ()
    assert info.convert_command() is None
    require_raw(info)  # no exception


def test_gpt_type_guids_are_named():
    img = gpt_image(2 * MiB, [(LINUX_FS, 40, 100, "root"), ("516E7CBA-6ECF-11D6-8FF8-00022D09712B", 101, 200, "zfs"),
                              ("00112233-4455-6677-8899-AABBCCDDEEFF", 201, 300, "")])
    info = identify(lambda off, n: bytes(img[off:off + n]), len(img))
    assert [p.type_name for p in info.partitions] == ["Linux filesystem", "FreeBSD ZFS", "unknown"]
    assert info.partitions[1].type == "516E7CBA-6ECF-11D6-8FF8-00022D09712B"


def test_gpt_crc_damage_is_noted_not_raised(tmp_path):
    info = inspect_image(write(tmp_path, "bad.raw", gpt_image(2 * MiB, [(FREEBSD_UFS, 40, 100, "r")],
                                                              corrupt_header_crc=True)))
    assert info.format == "raw" and info.partition_table == "gpt"
    assert any("header CRC32" in n for n in info.notes)


def test_gpt_entries_past_the_end_are_noted():
    img = gpt_image(2 * MiB, [(FREEBSD_UFS, 40, 100, "r")])
    short = img[:4 * 512]  # header intact, entry array cut after 2 sectors
    info = identify(lambda off, n: bytes(short[off:off + n]), len(short))
    assert info.partition_table == "gpt"
    assert any("past the end" in n for n in info.notes)
    assert [p.type_name for p in info.partitions] == ["FreeBSD UFS"]


def test_mbr_image_lists_primary_partitions(tmp_path):
    img = mbr_image(2 * MiB, [(0x83, 2048, 1024, True), (0x82, 3072, 512, False), (0xA5, 3584, 400, False)])
    info = inspect_image(write(tmp_path, "mbr.raw", img))
    assert info.partition_table == "mbr"
    assert [(p.index, p.type, p.type_name, p.bootable) for p in info.partitions] == [
        (1, "0x83", "Linux", True), (2, "0x82", "Linux swap", False), (3, "0xa5", "FreeBSD", False)]
    assert info.notes == ()


def test_mbr_partition_past_the_end_is_noted():
    img = mbr_image(1 * MiB, [(0x83, 2048, 100000, False)])
    info = identify(lambda off, n: bytes(img[off:off + n]), len(img))
    assert any("past the end" in n for n in info.notes)


def test_raw_without_table_is_still_raw(tmp_path):
    info = inspect_image(write(tmp_path, "blank.raw", bytes(MiB)))
    assert info.format == "raw" and info.partition_table is None and info.notes


@pytest.mark.parametrize("disk_type, name", [(2, "fixed"), (3, "dynamic"), (4, "differencing")])
def test_vhd_footer_at_the_end_is_recognised(tmp_path, disk_type, name):
    data = bytes(freebsd_like_image(MiB)) + vhd_footer(MiB, disk_type)
    info = inspect_image(write(tmp_path, "img.vhd", data))
    assert info.format == "vhd" and info.qemu_format == "vpc"
    assert name in info.detail and info.virtual_size == MiB
    assert info.notes == ()
    assert info.partitions == ()  # a VHD's partitions are not read as if it were RAW
    with pytest.raises(ImageFormatError) as err:
        require_raw(info)
    assert err.value.rule == "image.not_raw"
    assert f"qemu-img convert -f vpc -O raw {tmp_path}/img.vhd {tmp_path}/img.raw" in str(err.value)


def test_dynamic_vhd_copy_at_the_start_is_recognised(tmp_path):
    footer = vhd_footer(64 * MiB, 3)
    data = footer + b"cxsparse" + bytes(1024) + footer
    info = inspect_image(write(tmp_path, "dyn.vhd", data))
    assert info.format == "vhd" and "copy at the start" in info.detail and "dynamic" in info.detail


def test_vhd_checksum_is_checked():
    footer = bytearray(vhd_footer(MiB))
    assert parse_vhd_footer(bytes(footer)).checksum_ok
    footer[40] ^= 0xFF  # original size changed, checksum not updated
    assert not parse_vhd_footer(bytes(footer)).checksum_ok
    assert parse_vhd_footer(b"notconectix" + bytes(600)) is None


def test_qcow2_magic(tmp_path):
    header = b"QFI\xfb" + struct.pack(">I", 3) + bytes(16) + struct.pack(">Q", 5 << 30) + bytes(100)
    info = inspect_image(write(tmp_path, "x.qcow2", header))
    assert info.format == "qcow2" and info.virtual_size == 5 << 30 and "version 3" in info.detail
    with pytest.raises(ImageFormatError) as err:
        require_raw(info)
    assert "qemu-img convert -f qcow2 -O raw" in str(err.value) and str(tmp_path / "x.raw") in str(err.value)


def test_vmdk_sparse_and_descriptor(tmp_path):
    sparse = b"KDMV" + struct.pack("<II", 1, 3) + struct.pack("<Q", 2048) + bytes(500)
    info = inspect_image(write(tmp_path, "s.vmdk", sparse))
    assert info.format == "vmdk" and info.virtual_size == 2048 * 512
    desc = b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 2048 FLAT "f-flat.vmdk" 0\n'
    info = inspect_image(write(tmp_path, "d.vmdk", desc))
    assert info.format == "vmdk" and "monolithicFlat" in info.detail
    assert "qemu-img convert -f vmdk" in info.convert_command()


def test_vhdx_and_xz_and_tiny_files(tmp_path):
    assert inspect_image(write(tmp_path, "a.vhdx", b"vhdxfile" + bytes(1000))).qemu_format == "vhdx"
    xzinfo = inspect_image(write(tmp_path, "i.raw.xz", xz(bytes(4096))))
    assert xzinfo.format == "xz"
    with pytest.raises(ImageFormatError) as err:
        require_raw(xzinfo)
    assert f"xz -dk {tmp_path}/i.raw.xz" in str(err.value)
    for data, want in ((b"", "empty file"), (b"abc", "too small")):
        info = inspect_image(write(tmp_path, "t.bin", data))
        assert info.format == "unknown" and want in info.detail
        with pytest.raises(ImageFormatError):
            require_raw(info)


def test_missing_and_directory_are_one_line_errors(tmp_path):
    with pytest.raises(ImageFormatError) as err:
        inspect_image(tmp_path / "nope.raw")
    assert err.value.rule == "image.missing"
    with pytest.raises(ImageFormatError) as err:
        inspect_image(tmp_path)
    assert err.value.rule == "image.not_file"


def test_json_and_text_reports(tmp_path):
    info = inspect_image(write(tmp_path, "fbsd.raw", freebsd_like_image(2 * MiB)))
    data = info.to_json()
    assert data["format"] == "raw" and data["bootable_as_raw"] is True and data["convert"] is None
    assert data["partitions"][0]["type"] == FREEBSD_BOOT
    text = "\n".join(info.describe())
    assert "GPT partitions" in text and "FreeBSD UFS" in text and "'rootfs'" in text
    assert EFI_SYSTEM in text and FREEBSD_SWAP in text


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=0, max_size=4096))
def test_arbitrary_bytes_never_raise(data):
    info = identify(lambda off, n: data[off:off + n], len(data))
    assert info.format in {"raw", "vhd", "vhdx", "qcow2", "vmdk", "xz", "unknown"}


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=512, max_size=512))
def test_random_mbr_tables_never_raise(sector):
    sector = bytearray(sector)
    sector[510:512] = b"\x55\xaa"
    img = bytes(sector) + bytes(8192)
    info = identify(lambda off, k: img[off:off + k], len(img))
    assert info.format == "raw"


def test_the_conversion_never_writes_onto_its_source(tmp_path):
    # A VHD that calls itself .raw: the command must not name the same file twice.
    info = inspect_image(write(tmp_path, "disk.raw", bytes(MiB) + vhd_footer(MiB)))
    cmd = info.convert_command()
    assert cmd == f"qemu-img convert -f vpc -O raw {tmp_path}/disk.raw {tmp_path}/disk.converted.raw"
    for name in ("noext", "a.vhd", "b.qcow2"):
        data = (bytes(MiB) + vhd_footer(MiB)) if name != "b.qcow2" else b"QFI\xfb" + bytes(100)
        cmd = inspect_image(write(tmp_path, name, data)).convert_command()
        src, dst = cmd.split()[-2:]
        assert src == str(tmp_path / name) and dst != src and dst.endswith(".raw")


def test_odd_sizes_are_refused_with_the_padding_command(tmp_path):
    info = inspect_image(write(tmp_path, "odd.img", bytes(MiB + 100)))
    assert info.format == "raw" and not info.servable
    with pytest.raises(ImageFormatError) as err:
        require_raw(info)
    assert err.value.rule == "image.size"
    assert f"size {MiB + 100} is not a multiple of 512" in str(err.value)
    assert f"truncate -s %512 {tmp_path}/odd.img" in str(err.value)
    assert info.to_json()["bootable_as_raw"] is False
    assert info.to_json()["refusal"].startswith(f"{tmp_path}/odd.img: size {MiB + 100} ")
    assert any("not servable" in line for line in info.describe())


def test_detection_lives_in_the_core_and_reads_only_through_the_callers_function():
    from xentools.core import diskformat as core
    from xentools.tools.images import diskformat as tools

    assert tools.identify is core.identify and tools.ImageInfo is core.ImageInfo
    reads = []

    def read_at(offset, length):
        reads.append((offset, length))
        return bytes(min(length, 4 * MiB - offset))

    info = core.identify(read_at, 4 * MiB, "mem")
    assert info.is_raw and reads and core.raw_refusal(info) is None
