"""What kind of disk image some bytes are: RAW (with its MBR or GPT partitions), VHD, VHDX,
qcow2, vmdk, xz-compressed, or unknown; and whether such an image can be served as RAW.

Owns: the parsers of the MBR partition table, the GPT header and entries (with their CRC32
checks and the names of the partition type GUIDs a FreeBSD or Linux guest uses), the VHD
footer ("conectix", last 512 bytes, or first 512 for the copy a dynamic VHD starts with),
the qcow2, VMDK and VHDX magics, `identify` (reads through a callable the caller gives:
offset, length -> bytes), `ImageInfo` and `raw_refusal`, the one-line reason (with the
`qemu-img convert` or `xz -dk` command, or the `truncate` that pads an odd size) why an
image must not be served or booted as RAW. Shared by `xentools image` (tools) and blkback
(devices), so both judge an image alike.
Must not: open, read or write files (the caller's read_at does the reads), or raise on odd
content: a damaged table is reported in `notes`.

Why it matters: the seed's author found the VHD image of a release hanging at boot where
the RAW image of the same release booted. Serving a VHD as RAW hands its metadata to the
guest as if it were sectors; the guest then reads garbage, or nothing.
"""

from __future__ import annotations

import os.path
import shlex
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

__all__ = [
    "GPT_TYPES", "ImageInfo", "MBR_TYPES", "Partition", "SECTOR", "VhdFooter", "identify",
    "parse_gpt", "parse_mbr", "parse_vhd_footer", "raw_refusal",
]

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
GPT_SIGNATURE = b"EFI PART"
VHD_COOKIE = b"conectix"
QCOW_MAGIC = b"QFI\xfb"
VMDK_SPARSE_MAGIC = b"KDMV"
VMDK_DESCRIPTOR = b"# Disk DescriptorFile"
VHDX_MAGIC = b"vhdxfile"
XZ_MAGIC = b"\xfd7zXZ\x00"
# A GPT entry array larger than this is not read (the spec's minimum is 16 KiB).
GPT_ENTRIES_LIMIT = 1 << 20

MBR_TYPES = {
    0x01: "FAT12", 0x05: "extended", 0x06: "FAT16", 0x07: "NTFS/exFAT", 0x0B: "FAT32",
    0x0C: "FAT32 (LBA)", 0x0F: "extended (LBA)", 0x82: "Linux swap", 0x83: "Linux",
    0x8E: "Linux LVM", 0xA5: "FreeBSD", 0xA6: "OpenBSD", 0xA9: "NetBSD",
    0xEE: "GPT protective", 0xEF: "EFI system", 0xFD: "Linux RAID",
}

GPT_TYPES = {
    "83BD6B9D-7F41-11DC-BE0B-001560B84F0F": "FreeBSD boot",
    "516E7CB4-6ECF-11D6-8FF8-00022D09712B": "FreeBSD disklabel",
    "516E7CB5-6ECF-11D6-8FF8-00022D09712B": "FreeBSD swap",
    "516E7CB6-6ECF-11D6-8FF8-00022D09712B": "FreeBSD UFS",
    "516E7CB8-6ECF-11D6-8FF8-00022D09712B": "FreeBSD Vinum",
    "516E7CBA-6ECF-11D6-8FF8-00022D09712B": "FreeBSD ZFS",
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI system",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "024DEE41-33E7-11D3-9D69-0008C781F39F": "MBR partition scheme",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
}

# GPT header (UEFI spec 5.3.2), little-endian: signature, revision, header size, header CRC32,
# reserved, my LBA, alternate LBA, first usable, last usable, disk GUID, entries LBA, number
# of entries, entry size, entries CRC32.
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_MBR_ENTRY = struct.Struct("<B3sB3sII")
# VHD footer (Microsoft VHD spec), big-endian: cookie, features, version, data offset,
# timestamp, creator application, creator version, creator host OS, original size, current
# size, geometry, disk type, checksum, unique id, saved state.
_VHD_FOOTER = struct.Struct(">8sIIQI4sI4sQQIII16sB")
_VHD_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}


@dataclass(frozen=True)
class Partition:
    """One partition: 1-based index, first sector and length in sectors of `sector_size`."""

    index: int
    start_lba: int
    sectors: int
    type: str  # "0xa5" for MBR, the type GUID for GPT
    type_name: str
    name: str = ""
    bootable: bool = False


@dataclass(frozen=True)
class VhdFooter:
    disk_type: str
    current_size: int
    data_offset: int
    checksum_ok: bool


@dataclass(frozen=True)
class ImageInfo:
    """The format of an image file; partitions only for RAW."""

    path: str
    size: int
    format: str  # raw, vhd, vhdx, qcow2, vmdk, xz, unknown
    detail: str
    qemu_format: str | None = None  # qemu-img's name, for conversion
    virtual_size: int | None = None
    partition_table: str | None = None  # gpt, mbr, None
    sector_size: int = SECTOR
    partitions: tuple[Partition, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_raw(self) -> bool:
        return self.format == "raw"

    @property
    def size_ok(self) -> bool:
        """A disk is a whole number of 512-byte sectors (a trailing part sector is lost to
        the guest, and blkback refuses to serve it)."""
        return self.size > 0 and self.size % SECTOR == 0

    @property
    def servable(self) -> bool:
        """RAW and a whole number of sectors: what blkback serves and boot-test boots."""
        return raw_refusal(self) is None

    def convert_command(self) -> str | None:
        """The command that turns this image into a RAW one next to it, if there is one.
        Its output is never the input file (a VHD named disk.raw becomes disk.converted.raw)."""
        if self.format == "xz":
            return f"xz -dk {shlex.quote(self.path)}"
        if self.qemu_format:
            base, _ = os.path.splitext(self.path)
            out = base + ".raw"
            if out == self.path:
                out = base + ".converted.raw"
            return f"qemu-img convert -f {self.qemu_format} -O raw {shlex.quote(self.path)} {shlex.quote(out)}"
        return None

    def pad_command(self) -> str | None:
        """For a RAW image of an odd size: the command that pads it with zeroes to a whole
        number of sectors (what the guest sees of it is unchanged)."""
        if self.is_raw and not self.size_ok:
            return f"truncate -s %{SECTOR} {shlex.quote(self.path)}"
        return None

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["bootable_as_raw"] = self.servable
        data["convert"] = self.convert_command()
        refusal = raw_refusal(self)
        data["refusal"] = refusal[1] if refusal else None
        return data

    def describe(self) -> list[str]:
        """Human-readable lines for `xentools image inspect`."""
        lines = [f"{self.path}: {self.detail}"]
        if self.virtual_size is not None and self.format != "raw":
            lines.append(f"  virtual size: {self.virtual_size} bytes")
        if self.partitions:
            lines.append(f"  {self.partition_table.upper() if self.partition_table else ''} partitions "
                         f"({self.sector_size}-byte sectors):")
            for p in self.partitions:
                label = f" {p.name!r}" if p.name else ""
                boot = " (active)" if p.bootable else ""
                lines.append(f"    {p.index:>3}  start {p.start_lba:>10}  sectors {p.sectors:>10}  "
                             f"{p.type_name} [{p.type}]{label}{boot}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        cmd = self.convert_command()
        if cmd:
            lines.append(f"  not RAW; to make it RAW: {cmd}")
        pad = self.pad_command()
        if pad:
            lines.append(f"  not servable: size {self.size} is not a multiple of {SECTOR} bytes;"
                         f" pad it with zeroes: {pad}")
        return lines


def raw_refusal(info: ImageInfo) -> tuple[str, str] | None:
    """(rule, one-line message naming the fix) when `info` must not be served or booted as a
    RAW disk; None when it may. Rules: image.not_raw (another format, with the command that
    converts it), image.size (a RAW file that is not a whole number of sectors)."""
    if not info.is_raw:
        cmd = info.convert_command()
        verb = "decompress" if info.format == "xz" else "convert"
        how = f"; {verb} it first: {cmd}" if cmd else ""
        return "image.not_raw", f"{info.path} is {info.detail}, not a RAW disk image{how}"
    if not info.size_ok:
        return "image.size", (
            f"{info.path}: size {info.size} is not a multiple of {SECTOR} bytes;"
            f" pad it with zeroes: {info.pad_command()}"
        )
    return None


ReadAt = Callable[[int, int], bytes]


def parse_mbr(sector: bytes, disk_sectors: int | None = None) -> tuple[tuple[Partition, ...], list[str]] | None:
    """Primary partitions of a classic MBR, or None when the 0x55AA signature is absent."""
    if len(sector) < SECTOR or sector[510:512] != MBR_SIGNATURE:
        return None
    parts = []
    notes = []
    for i in range(4):
        status, _, ptype, _, first, count = _MBR_ENTRY.unpack_from(sector, 446 + 16 * i)
        if ptype == 0:
            continue
        if status not in (0x00, 0x80):
            notes.append(f"MBR entry {i + 1}: status byte 0x{status:02x} is neither 0x00 nor 0x80")
        if disk_sectors is not None and first + count > disk_sectors and ptype != 0xEE:
            notes.append(f"MBR partition {i + 1} ends past the end of the image")
        parts.append(Partition(i + 1, first, count, f"0x{ptype:02x}", MBR_TYPES.get(ptype, "unknown"),
                               bootable=status == 0x80))
    return tuple(parts), notes


def _guid(raw: bytes) -> str:
    # GPT stores the first three GUID fields little-endian (the "mixed-endian" layout).
    return str(uuid.UUID(bytes_le=raw)).upper()


def parse_gpt(read_at: ReadAt, size: int, sector_size: int) -> tuple[tuple[Partition, ...], list[str]] | None:
    """GPT partitions from the primary header at LBA 1, or None when it is not there."""
    header = read_at(sector_size, sector_size)
    if len(header) < _GPT_HEADER.size or header[:8] != GPT_SIGNATURE:
        return None
    (_, _, hsize, hcrc, _, my_lba, _, _, _, _, entries_lba, count, esize, ecrc) = _GPT_HEADER.unpack_from(header)
    notes: list[str] = []
    if not _GPT_HEADER.size <= hsize <= sector_size:
        return (), [f"GPT header size {hsize} is out of range"]
    check = bytearray(header[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc:
        notes.append("GPT header CRC32 mismatch (damaged or edited header)")
    if my_lba != 1:
        notes.append(f"GPT header says it lives at LBA {my_lba}, not 1")
    if esize < _GPT_ENTRY.size or esize % 8:
        return (), notes + [f"GPT entry size {esize} is invalid"]
    if count * esize > GPT_ENTRIES_LIMIT:
        notes.append(f"GPT lists {count} entries; only the first {GPT_ENTRIES_LIMIT // esize} were read")
        count = GPT_ENTRIES_LIMIT // esize
    raw = read_at(entries_lba * sector_size, count * esize)
    if len(raw) < count * esize:
        notes.append("GPT entry array runs past the end of the image")
        count = len(raw) // esize
        raw = raw[:count * esize]
    elif zlib.crc32(raw) != ecrc:
        notes.append("GPT entry array CRC32 mismatch")
    disk_sectors = size // sector_size
    parts = []
    for i in range(count):
        tguid, _, first, last, _, name = _GPT_ENTRY.unpack_from(raw, i * esize)
        if tguid == bytes(16):
            continue
        type_guid = _guid(tguid)
        if last < first:
            notes.append(f"GPT partition {i + 1} ends before it starts")
        elif last >= disk_sectors:
            notes.append(f"GPT partition {i + 1} ends past the end of the image")
        label = name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(Partition(i + 1, first, max(0, last - first + 1), type_guid,
                               GPT_TYPES.get(type_guid, "unknown"), label))
    return tuple(parts), notes


def parse_vhd_footer(block: bytes) -> VhdFooter | None:
    """The VHD footer in a 512-byte block, or None when the cookie is not there."""
    if len(block) < SECTOR or block[:8] != VHD_COOKIE:
        return None
    fields = _VHD_FOOTER.unpack_from(block)
    data_offset, current_size, disk_type, checksum = fields[3], fields[9], fields[11], fields[12]
    zeroed = bytearray(block[:SECTOR])
    zeroed[64:68] = b"\0\0\0\0"
    # The checksum is the one's complement of the byte sum with the checksum field zeroed.
    ok = (~sum(zeroed)) & 0xFFFFFFFF == checksum
    return VhdFooter(_VHD_TYPES.get(disk_type, f"type {disk_type}"), current_size, data_offset, ok)


def _vhd_info(path: str, size: int, footer: VhdFooter, where: str) -> ImageInfo:
    notes = () if footer.checksum_ok else ("VHD footer checksum mismatch",)
    return ImageInfo(path, size, "vhd", f"VHD ({footer.disk_type}, footer {where}), virtual size {footer.current_size} bytes",
                     qemu_format="vpc", virtual_size=footer.current_size, notes=notes)


def identify(read_at: ReadAt, size: int, path: str = "<image>") -> ImageInfo:
    """Identify an image from reads of it (offset, length -> bytes, short at the end)."""
    if size == 0:
        return ImageInfo(path, 0, "unknown", "empty file")
    head = read_at(0, 4096)
    if head.startswith(XZ_MAGIC):
        return ImageInfo(path, size, "xz", "an xz-compressed file")
    if head.startswith(QCOW_MAGIC) and len(head) >= 32:
        version, = struct.unpack_from(">I", head, 4)
        vsize, = struct.unpack_from(">Q", head, 24)
        return ImageInfo(path, size, "qcow2", f"qcow2 version {version}, virtual size {vsize} bytes",
                         qemu_format="qcow2", virtual_size=vsize)
    if head.startswith(VMDK_SPARSE_MAGIC) and len(head) >= 20:
        version, = struct.unpack_from("<I", head, 4)
        capacity, = struct.unpack_from("<Q", head, 12)
        return ImageInfo(path, size, "vmdk", f"VMDK sparse extent version {version}, virtual size {capacity * SECTOR} bytes",
                         qemu_format="vmdk", virtual_size=capacity * SECTOR)
    if head.startswith(VMDK_DESCRIPTOR):
        create_type = "unknown"
        for line in head.decode("ascii", errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "createType":
                create_type = value.strip().strip('"')
        return ImageInfo(path, size, "vmdk", f"VMDK descriptor (createType {create_type})", qemu_format="vmdk")
    if head.startswith(VHDX_MAGIC):
        return ImageInfo(path, size, "vhdx", "VHDX", qemu_format="vhdx")
    footer = parse_vhd_footer(head[:SECTOR])
    if footer is not None:
        return _vhd_info(path, size, footer, "copy at the start")
    if size >= SECTOR:
        footer = parse_vhd_footer(read_at(size - SECTOR, SECTOR))
        if footer is not None:
            return _vhd_info(path, size, footer, "at the end")
    if size < SECTOR:
        return ImageInfo(path, size, "unknown", f"{size} bytes: too small for a disk image")
    mbr = parse_mbr(head[:SECTOR], size // SECTOR)
    protective = mbr is not None and any(p.type == "0xee" for p in mbr[0])
    if mbr is None or protective:
        for sector_size in (SECTOR, 4096):
            gpt = parse_gpt(read_at, size, sector_size)
            if gpt is not None:
                parts, notes = gpt
                if mbr is None:
                    notes = ["GPT without a protective MBR", *notes]
                return ImageInfo(path, size, "raw", f"RAW disk image, GPT with {len(parts)} partition(s)",
                                 virtual_size=size, partition_table="gpt", sector_size=sector_size,
                                 partitions=parts, notes=tuple(notes))
    if mbr is not None:
        parts, notes = mbr
        if protective:
            notes = [*notes, "protective MBR but no valid GPT header"]
        return ImageInfo(path, size, "raw", f"RAW disk image, MBR with {len(parts)} partition(s)",
                         virtual_size=size, partition_table="mbr", partitions=parts, notes=tuple(notes))
    return ImageInfo(path, size, "raw", "RAW disk image without a partition table", virtual_size=size,
                     notes=("no MBR or GPT: a bare file system, or an empty disk",))


