"""Virtual block device numbers of xen-vbd-interface(7): names <-> the `virtual-device` key.

Owns: `encode_vbd` (a disk name as a user writes it -> the number written to the frontend's
`virtual-device` key), `decode_vbd` (number -> canonical name), and `split_vbd` (number ->
bus, disk, partition).
Must not: look at xenstore or at the guest's /dev; it is arithmetic on names and numbers.

Encodings (xen-vbd-interface(7), "Concrete encoding in the VBD interface"):

     1 << 28 | disk << 8 | partition      xvd, disks or partitions 16 onwards
    202 << 8 | disk << 4 | partition      xvd, disks and partitions up to 15
      8 << 8 | disk << 4 | partition      sd, disks and partitions up to 15
      3 << 8 | disk << 6 | partition      hd, disks 0..1, partitions 0..63
     22 << 8 | (disk-2) << 6 | partition  hd, disks 2..3, partitions 0..63
     2 << 28 onwards                      reserved for future use

The extended (1 << 28) form holds disks up to 2**20 - 1 and partitions up to 255, and is
used only where the 202 form lacks bits. xvda = 51712, xvdb = 51728, hda = 768, sda = 2048.

Deprecated encodings: the manpage deprecates "Linux-specific encodings for SCSI disks beyond
disk 15 partition 15, and IDE disks beyond disk 3 partition 63", and libxl refuses them. Old
guests read those numbers as Linux major << 8 | minor: IDE majors 3, 22, 33, 34, 56, 57, 88,
89, 90, 91 (two disks of 64 minors each: hda..hdt) and SCSI majors 8, 65..71 (sixteen disks
of 16 minors each: sda..sddx). `decode_vbd` understands them by default (a frontend should
understand what it can); `encode_vbd` produces them only with `allow_deprecated=True` (a
toolstack should not write them).

Names: `xvd<letters>[<partition>]`, `sd<letters>[<partition>]`, `hd<letter>[<partition>]`,
`d<disk>[p<partition>]` (xvd disk <disk>), or a plain decimal number (taken as the encoded
value itself, and checked by decoding it). Letters count a, b, .. z, aa, ab, .. (disk 26 is
"aa", disk 536 is "tq"). Partitions are written without leading zeros and from 1; partition 0
is the whole disk and is written by leaving the number out, except in the `d<disk>p0` form,
which the manpage shows. Every failure raises VbdError with a stable rule.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from xentools.core.errors import VbdError

__all__ = ["Vbd", "decode_vbd", "encode_vbd", "split_vbd"]

XVD_MAJOR = 202
EXTENDED = 1 << 28
RESERVED = 2 << 28
EXTENDED_MAX_DISK = (1 << 20) - 1
EXTENDED_MAX_PARTITION = 255

# Linux IDE majors ide0..ide9; each holds two disks of 64 minors. Only 3 and 22 (hda..hdd)
# are in the manpage's table.
HD_MAJORS = (3, 22, 33, 34, 56, 57, 88, 89, 90, 91)
HD_CANONICAL_DISKS = 4
HD_MAX_PARTITION = 63
# Linux SCSI disk majors sd0..sd7; each holds sixteen disks of 16 minors. Only 8 (sda..sdp)
# is in the manpage's table.
SD_MAJORS = (8, 65, 66, 67, 68, 69, 70, 71)
SD_CANONICAL_DISKS = 16
SD_MAX_PARTITION = 15

_LETTERS = frozenset(string.ascii_lowercase)
_DIGITS = frozenset(string.digits)


@dataclass(frozen=True)
class Vbd:
    """A decoded virtual device: bus ("xvd", "hd" or "sd"), disk index, partition (0 = whole
    disk), and whether the number used a deprecated Linux-specific encoding."""

    bus: str
    disk: int
    partition: int
    deprecated: bool = False

    @property
    def name(self) -> str:
        suffix = str(self.partition) if self.partition else ""
        return f"{self.bus}{_disk_letters(self.disk)}{suffix}"


def _disk_letters(disk: int) -> str:
    # Bijective base 26: 0 -> "a", 25 -> "z", 26 -> "aa".
    letters = []
    disk += 1
    while disk:
        disk, rest = divmod(disk - 1, 26)
        letters.append(chr(ord("a") + rest))
    return "".join(reversed(letters))


def _letters_disk(letters: str, name: str, limit: int) -> int:
    disk = 0
    for letter in letters:
        disk = disk * 26 + (ord(letter) - ord("a") + 1)
        if disk - 1 > limit:  # stop early: a long run of letters must not build a huge int
            raise VbdError("vbd.name.disk-range", f"{name!r}: disk is above {limit}")
    return disk - 1


def _decimal(text: str, name: str, what: str) -> int:
    if not text or not _DIGITS.issuperset(text):
        raise VbdError("vbd.name.malformed", f"{name!r}: {what} {text!r} is not a decimal number")
    if len(text) > 1 and text[0] == "0":
        raise VbdError("vbd.name.malformed", f"{name!r}: {what} {text!r} has a leading zero")
    if len(text) > 10:
        raise VbdError(f"vbd.name.{what}-range", f"{name!r}: {what} {text} is too large")
    return int(text)


def _split_letters(rest: str, name: str) -> tuple[str, int]:
    """Split "<letters><partition>" into letters and partition (0 when absent)."""
    end = 0
    while end < len(rest) and rest[end] in _LETTERS:
        end += 1
    letters, digits = rest[:end], rest[end:]
    if not letters:
        raise VbdError("vbd.name.malformed", f"{name!r}: no disk letters")
    if not digits:
        return letters, 0
    partition = _decimal(digits, name, "partition")
    if partition == 0:
        raise VbdError(
            "vbd.name.malformed", f"{name!r}: partition 0 is written by leaving the number out"
        )
    return letters, partition


def _encode_xvd(disk: int, partition: int, name: str) -> int:
    if disk > EXTENDED_MAX_DISK:
        raise VbdError("vbd.name.disk-range", f"{name!r}: disk {disk} is above {EXTENDED_MAX_DISK}")
    if partition > EXTENDED_MAX_PARTITION:
        raise VbdError(
            "vbd.name.partition-range",
            f"{name!r}: partition {partition} is above {EXTENDED_MAX_PARTITION}",
        )
    if disk <= 15 and partition <= 15:
        return XVD_MAJOR << 8 | disk << 4 | partition
    # The manpage: the 1 << 28 form "will be used only where the 202<<8 format does not have
    # enough bits".
    return EXTENDED | disk << 8 | partition


def _encode_linux_disk(name: str, majors: tuple[int, ...], disks_per_major: int, max_partition: int,
                       canonical_disks: int, allow_deprecated: bool) -> int:
    """hd<letters>[N] or sd<letters>[N]: Linux's IDE or SCSI numbering, `disks_per_major`
    disks of (max_partition + 1) minors in each major."""
    kind = name[:2]
    letters, partition = _split_letters(name[2:], name)
    disk = _letters_disk(letters, name, len(majors) * disks_per_major - 1)
    if partition > max_partition:
        raise VbdError("vbd.name.partition-range", f"{name!r}: {kind} partitions end at {max_partition}")
    if disk >= canonical_disks and not allow_deprecated:
        raise VbdError(
            "vbd.name.deprecated",
            f"{name!r}: {kind} disks beyond {kind}{_disk_letters(canonical_disks - 1)} are deprecated "
            "(xen-vbd-interface(7))",
        )
    minor = (disk % disks_per_major) * (max_partition + 1) | partition
    return majors[disk // disks_per_major] << 8 | minor


def encode_vbd(name: str, *, allow_deprecated: bool = False) -> int:
    """The `virtual-device` number for a disk name (see the module docstring for syntax)."""
    if not isinstance(name, str):
        raise VbdError("vbd.name.malformed", f"{name!r} is not a string")
    if not name.isascii() or not name:
        raise VbdError("vbd.name.malformed", f"{name!r} is not a disk name")
    if _DIGITS.issuperset(name):
        number = _decimal(name, name, "number")
        split_vbd(number, allow_deprecated=allow_deprecated)  # raises unless it is valid
        return number
    if name.startswith("xvd"):
        letters, partition = _split_letters(name[3:], name)
        return _encode_xvd(_letters_disk(letters, name, EXTENDED_MAX_DISK), partition, name)
    if name.startswith("hd"):
        return _encode_linux_disk(name, HD_MAJORS, 2, HD_MAX_PARTITION, HD_CANONICAL_DISKS, allow_deprecated)
    if name.startswith("sd"):
        return _encode_linux_disk(name, SD_MAJORS, 16, SD_MAX_PARTITION, SD_CANONICAL_DISKS, allow_deprecated)
    if name.startswith("d"):
        disk_text, sep, part_text = name[1:].partition("p")
        disk = _decimal(disk_text, name, "disk")
        partition = _decimal(part_text, name, "partition") if sep else 0
        return _encode_xvd(disk, partition, name)
    raise VbdError("vbd.name.malformed", f"{name!r} is not an xvd, hd, sd or d<N>p<M> name")


def split_vbd(number: int, *, allow_deprecated: bool = True) -> Vbd:
    """Decode a `virtual-device` number into bus, disk and partition."""
    if not isinstance(number, int) or isinstance(number, bool):
        raise VbdError("vbd.number.malformed", f"{number!r} is not an int")
    if number < 0:
        raise VbdError("vbd.number.malformed", f"{number} is negative")
    if number >= RESERVED:
        raise VbdError("vbd.number.reserved", f"{number:#x}: 2 << 28 onwards is reserved")
    if number & EXTENDED:
        return Vbd("xvd", (number >> 8) & EXTENDED_MAX_DISK, number & 0xFF)
    major, minor = number >> 8, number & 0xFF
    if major == XVD_MAJOR:
        return Vbd("xvd", minor >> 4, minor & 0xF)
    if major in HD_MAJORS:
        # Two disks of 64 minors per IDE major: minors 128..255 name no disk.
        if minor >> 6 > 1:
            raise VbdError(
                "vbd.number.minor-range",
                f"{number}: minor {minor} of IDE major {major} is above 127",
            )
        disk = HD_MAJORS.index(major) * 2 + (minor >> 6)
        result = Vbd("hd", disk, minor & 0x3F, deprecated=disk >= HD_CANONICAL_DISKS)
    elif major in SD_MAJORS:
        disk = SD_MAJORS.index(major) * 16 + (minor >> 4)
        result = Vbd("sd", disk, minor & 0xF, deprecated=disk >= SD_CANONICAL_DISKS)
    else:
        raise VbdError("vbd.number.unknown-major", f"{number}: major {major} is not xvd, hd or sd")
    if result.deprecated and not allow_deprecated:
        raise VbdError(
            "vbd.number.deprecated", f"{number}: {result.name} uses a deprecated Linux encoding"
        )
    return result


def decode_vbd(number: int, *, allow_deprecated: bool = True) -> str:
    """The canonical name of a `virtual-device` number: xvd* for the 202 and extended forms
    (an extended number that would fit the 202 form still decodes, to the same name), hd*
    and sd* for their majors."""
    return split_vbd(number, allow_deprecated=allow_deprecated).name
