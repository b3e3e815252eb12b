"""Tests of xentools.core.vbd: the xen-vbd-interface(7) examples and known numbers, round
trips over every canonical range, the deprecated Linux encodings, and rejected input."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.core.errors import VbdError
from xentools.core.vbd import Vbd, decode_vbd, encode_vbd, split_vbd


def _raises(rule: str):
    return pytest.raises(VbdError, match=f"^{re.escape(rule)}: ")


def _letters(disk: int) -> str:
    """Reference: spreadsheet-column letters, computed differently from vbd.py (by counting
    the width first)."""
    width, first = 1, 0
    while disk >= first + 26**width:
        first += 26**width
        width += 1
    offset = disk - first
    out = ""
    for _ in range(width):
        offset, rest = divmod(offset, 26)
        out = "abcdefghijklmnopqrstuvwxyz"[rest] + out
    return out


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("xvda", 51712),
        ("xvdb", 51728),
        ("hda", 768),
        ("sda", 2048),
        ("xvda1", 51713),
        ("xvdp15", 202 << 8 | 15 << 4 | 15),
        ("xvdq", 1 << 28 | 16 << 8),
        ("xvda16", 1 << 28 | 0 << 8 | 16),
        ("hdb", 3 << 8 | 1 << 6),
        ("hdc2", 22 << 8 | 2),  # manpage: "hdc2  IDE disk 2 partition 2"
        ("hdd63", 22 << 8 | 1 << 6 | 63),
        ("sdb3", 8 << 8 | 1 << 4 | 3),  # manpage: "sdb3  SCSI disk 1 partition 3"
        ("sdp15", 8 << 8 | 15 << 4 | 15),
        ("xvdtq37", 1 << 28 | 536 << 8 | 37),  # manpage: "d536p37  xvdtq37"
    ],
)
def test_known_values(name: str, number: int) -> None:
    assert encode_vbd(name) == number
    assert decode_vbd(number) == name


@pytest.mark.parametrize(
    ("config", "name"),
    [
        ("d0", "xvda"),
        ("d0p0", "xvda"),
        ("d1p2", "xvdb2"),
        ("d536p37", "xvdtq37"),
        ("d15p15", "xvdp15"),
        ("d16", "xvdq"),
    ],
)
def test_manpage_d_forms(config: str, name: str) -> None:
    assert encode_vbd(config) == encode_vbd(name)
    assert decode_vbd(encode_vbd(config)) == name


def test_letters() -> None:
    for disk, letters in [
        (0, "a"),
        (25, "z"),
        (26, "aa"),
        (27, "ab"),
        (701, "zz"),
        (702, "aaa"),
        (18277, "zzz"),
    ]:
        assert _letters(disk) == letters
        assert decode_vbd(encode_vbd(f"d{disk}")) == f"xvd{letters}"


def test_xvd_round_trip_over_ranges() -> None:
    disks = [*range(0, 800), *range(18270, 18290), (1 << 20) - 2, (1 << 20) - 1]
    for disk in disks:
        for partition in (0, 1, 15, 16, 255):
            name = f"xvd{_letters(disk)}{partition or ''}"
            number = encode_vbd(name)
            assert number == encode_vbd(f"d{disk}p{partition}")
            if disk <= 15 and partition <= 15:
                assert number == 202 << 8 | disk << 4 | partition
            else:
                assert number == 1 << 28 | disk << 8 | partition
            assert decode_vbd(number) == name
            assert split_vbd(number) == Vbd("xvd", disk, partition)


def test_every_202_number_round_trips() -> None:
    for number in range(202 << 8, 203 << 8):
        assert encode_vbd(decode_vbd(number)) == number


def test_hd_and_sd_round_trip() -> None:
    for disk, letter in enumerate("abcd"):
        for partition in range(64):
            name = f"hd{letter}{partition or ''}"
            number = encode_vbd(name)
            assert number == ((3 if disk < 2 else 22) << 8 | (disk % 2) << 6 | partition)
            assert decode_vbd(number) == name
    for disk in range(16):
        for partition in range(16):
            name = f"sd{_letters(disk)}{partition or ''}"
            assert encode_vbd(name) == 8 << 8 | disk << 4 | partition
            assert decode_vbd(encode_vbd(name)) == name


def test_deprecated_linux_encodings() -> None:
    hd_majors = [3, 22, 33, 34, 56, 57, 88, 89, 90, 91]
    for disk in range(4, 20):
        name = f"hd{_letters(disk)}5"
        with _raises("vbd.name.deprecated"):
            encode_vbd(name)
        number = encode_vbd(name, allow_deprecated=True)
        assert number == hd_majors[disk // 2] << 8 | (disk % 2) << 6 | 5
        assert decode_vbd(number) == name
        assert split_vbd(number).deprecated
        with _raises("vbd.number.deprecated"):
            decode_vbd(number, allow_deprecated=False)
    sd_majors = [8, 65, 66, 67, 68, 69, 70, 71]
    for disk in range(16, 128):
        name = f"sd{_letters(disk)}"
        with _raises("vbd.name.deprecated"):
            encode_vbd(name)
        number = encode_vbd(name, allow_deprecated=True)
        assert number == sd_majors[disk // 16] << 8 | (disk % 16) << 4
        assert decode_vbd(number) == name
    assert decode_vbd(encode_vbd("sddx", allow_deprecated=True)) == "sddx"  # disk 127, the last
    assert not split_vbd(768).deprecated


def test_extended_form_of_a_small_disk_still_decodes() -> None:
    assert decode_vbd(1 << 28 | 0 << 8 | 1) == "xvda1"
    assert encode_vbd(decode_vbd(1 << 28 | 3 << 8)) == 202 << 8 | 3 << 4


def test_decimal_numbers_as_names() -> None:
    assert encode_vbd("51712") == 51712
    assert encode_vbd("768") == 768
    assert encode_vbd(str(1 << 28 | 536 << 8 | 37)) == 1 << 28 | 536 << 8 | 37
    assert encode_vbd(str(34 << 8), allow_deprecated=True) == 34 << 8
    with _raises("vbd.number.deprecated"):
        encode_vbd(str(34 << 8))
    with _raises("vbd.number.unknown-major"):
        encode_vbd("1792")  # 7 << 8
    with _raises("vbd.name.malformed"):
        encode_vbd("051712")
    with _raises("vbd.number.reserved"):
        encode_vbd(str(2 << 28))


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "vbd.name.malformed"),
        ("xvd", "vbd.name.malformed"),
        ("xvd1", "vbd.name.malformed"),
        ("xvdA", "vbd.name.malformed"),
        ("XVDA", "vbd.name.malformed"),
        ("xvda0", "vbd.name.malformed"),
        ("xvda01", "vbd.name.malformed"),
        ("xvda1b", "vbd.name.malformed"),
        (" xvda", "vbd.name.malformed"),
        ("xvda ", "vbd.name.malformed"),
        ("xvda\n", "vbd.name.malformed"),
        ("xvd\u00e4", "vbd.name.malformed"),
        ("vda", "vbd.name.malformed"),
        ("nvme0n1", "vbd.name.malformed"),
        ("xvda256", "vbd.name.partition-range"),
        ("xvda99999999999", "vbd.name.partition-range"),
        ("xvdbgqcw", "vbd.name.disk-range"),  # disk 2**20
        ("xvd" + "z" * 50, "vbd.name.disk-range"),
        ("hda64", "vbd.name.partition-range"),
        ("hdu", "vbd.name.disk-range"),
        ("hdaa", "vbd.name.disk-range"),
        ("hd", "vbd.name.malformed"),
        ("sda16", "vbd.name.partition-range"),
        ("sddy", "vbd.name.disk-range"),
        ("d", "vbd.name.malformed"),
        ("dp1", "vbd.name.malformed"),
        ("d1p", "vbd.name.malformed"),
        ("d01", "vbd.name.malformed"),
        ("d1p01", "vbd.name.malformed"),
        ("d-1", "vbd.name.malformed"),
        ("d1q2", "vbd.name.malformed"),
        ("d1048576", "vbd.name.disk-range"),
        ("d0p256", "vbd.name.partition-range"),
    ],
)
def test_bad_names(name: str, rule: str) -> None:
    with _raises(rule):
        encode_vbd(name, allow_deprecated=True)


def test_bad_name_types() -> None:
    for bad in (51712, b"xvda", None):
        with _raises("vbd.name.malformed"):
            encode_vbd(bad)  # type: ignore[arg-type]


def test_disk_range_boundary() -> None:
    assert _letters((1 << 20) - 1) == "bgqcv"
    assert encode_vbd("xvdbgqcv") == 1 << 28 | ((1 << 20) - 1) << 8


@pytest.mark.parametrize(
    ("number", "rule"),
    [
        (-1, "vbd.number.malformed"),
        (True, "vbd.number.malformed"),
        ("51712", "vbd.number.malformed"),
        (1.0, "vbd.number.malformed"),
        (2 << 28, "vbd.number.reserved"),
        (2**64, "vbd.number.reserved"),
        (0, "vbd.number.unknown-major"),
        (7 << 8, "vbd.number.unknown-major"),
        (201 << 8 | 255, "vbd.number.unknown-major"),
        (1 << 16, "vbd.number.unknown-major"),
        ((1 << 28) - 1, "vbd.number.unknown-major"),
        (3 << 8 | 128, "vbd.number.minor-range"),
        (91 << 8 | 255, "vbd.number.minor-range"),
    ],
)
def test_bad_numbers(number: object, rule: str) -> None:
    with _raises(rule):
        decode_vbd(number)  # type: ignore[arg-type]


def _canonical(number: int) -> int:
    if number & 1 << 28:
        disk, partition = (number >> 8) & 0xFFFFF, number & 0xFF
        if disk <= 15 and partition <= 15:
            return 202 << 8 | disk << 4 | partition
    return number


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.integers(0, (2 << 28) - 1),
        st.integers(0, 0xFFFF),
        st.integers(1 << 28, (2 << 28) - 1),
        st.sampled_from([3, 22, 33, 34, 56, 57, 88, 89, 90, 91, 8, 65, 71, 202]).flatmap(
            lambda major: st.integers(major << 8, major << 8 | 0xFF)
        ),
    )
)
def test_any_number_decodes_to_a_name_that_encodes_back(number: int) -> None:
    try:
        name = decode_vbd(number)
    except VbdError as err:
        assert not number & 1 << 28
        if err.rule == "vbd.number.minor-range":
            assert number >> 8 in {3, 22, 33, 34, 56, 57, 88, 89, 90, 91} and number & 0xFF >= 128
        else:
            assert err.rule == "vbd.number.unknown-major"
            assert number >> 8 not in {
                202,
                3,
                22,
                33,
                34,
                56,
                57,
                88,
                89,
                90,
                91,
                8,
                65,
                66,
                67,
                68,
                69,
                70,
                71,
            }
    else:
        assert encode_vbd(name, allow_deprecated=True) == _canonical(number)
