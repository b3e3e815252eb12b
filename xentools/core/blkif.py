"""blkif wire structs: requests, responses and indirect segment pages of xen/io/blkif.h.

Owns: the constants of blkif.h, THE one description of every blkif struct per ABI (`Abi`:
every size and field offset, x86_64 and x86_32; `StructLayout`: each struct as a table of
fields with C type, offset and width, from which both the precompiled struct.Struct of
`SlotCodec` and C `_Static_assert` lines are generated), the slot codec every device uses
on its hot path (`SlotCodec`, `codec_for`: one pack or unpack per slot), the frozen message
dataclasses (`Segment`, `Request`, `DiscardRequest`, `IndirectRequest`, `Response`)
validated on construction, and their encoders and decoders (built on the same codec).
No other module may hold a struct format of a blkif struct (tests/test_blkif_codec.py
checks the source tree); a compiled ring loop checks its C declarations with
`StructLayout.c_asserts()` against this description and the installed header.
Must not: do any I/O, touch a ring index, or keep state between calls. Whether a request
fits the disk (sector range, read-only mode, advertised features) is the backend's decision,
not this module's: here only the structure of the bytes is judged.

Rules followed (each violation raises `BlkifError` with a stable `rule`):
- XSA-155: a decoder copies the struct out of the given buffer once, then reads every field
  from that private copy, so a peer changing shared memory meanwhile cannot make two reads of
  one field disagree. Decoders never write to their input and ignore bytes past the struct.
- XSA-216: encoders build the whole struct from zero bytes, so padding never carries stale
  or uninitialised data to the peer.
- Segments name sectors inside one 4 KiB frame, inclusive: `first_sect <= last_sect < 8`.
- READ and WRITE carry 1..11 direct segments; WRITE_BARRIER and FLUSH_DISKCACHE carry 0..11
  (Linux sends FUA writes as a flush with data). INDIRECT wraps only READ or WRITE, with
  1..4096 segments in ceil(n / 512) indirect pages.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import ClassVar

from xentools.core.errors import BlkifError

__all__ = [
    "ABIS",
    "Abi",
    "AnyRequest",
    "BLKIF_DISCARD_SECURE",
    "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
    "BLKIF_MAX_INDIRECT_SEGMENTS",
    "BLKIF_MAX_SEGMENTS_PER_REQUEST",
    "BLKIF_OP_DISCARD",
    "BLKIF_OP_FLUSH_DISKCACHE",
    "BLKIF_OP_INDIRECT",
    "BLKIF_OP_READ",
    "BLKIF_OP_RESERVED_1",
    "BLKIF_OP_WRITE",
    "BLKIF_OP_WRITE_BARRIER",
    "BLKIF_RSP_EOPNOTSUPP",
    "BLKIF_RSP_ERROR",
    "BLKIF_RSP_OKAY",
    "DiscardRequest",
    "Field",
    "IndirectRequest",
    "PAGE_SIZE",
    "Request",
    "RequestHeader",
    "Response",
    "SECTORS_PER_PAGE",
    "SECTOR_SIZE",
    "SEGMENT_SIZE",
    "SEGS_PER_INDIRECT_FRAME",
    "Segment",
    "SlotCodec",
    "StructLayout",
    "VDISK_CDROM",
    "VDISK_READONLY",
    "VDISK_REMOVABLE",
    "X86_32",
    "X86_64",
    "abi_for_protocol",
    "codec_for",
    "decode_indirect_segments",
    "decode_request",
    "decode_request_header",
    "decode_response",
    "encode_indirect_pages",
    "encode_request",
    "encode_response",
    "indirect_pages_for",
    "layouts_for",
]

# --- Constants, as named and numbered in xen/io/blkif.h ---------------------------------

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4  # was BLKIF_OP_TRIM in a vendor tree; never valid on the wire
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_RSP_OKAY = 0
BLKIF_RSP_ERROR = -1
BLKIF_RSP_EOPNOTSUPP = -2

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_DISCARD_SECURE = 1 << 0

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# Ring and grant pages are always 4 KiB for Xen protocols (ring.h: XEN_PAGE_SHIFT 12),
# whatever page size the guest OS uses; sectors in requests are 512-byte units.
PAGE_SIZE = 4096
SECTOR_SIZE = 512
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE  # 8: last_sect must stay below this

SEGMENT_SIZE = 8  # sizeof(struct blkif_request_segment): gref u32, two u8, two pad bytes
SEGS_PER_INDIRECT_FRAME = PAGE_SIZE // SEGMENT_SIZE  # 512
BLKIF_MAX_INDIRECT_SEGMENTS = (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_INDIRECT_FRAME
)  # 4096 (16 MiB)

# Operations a frontend may put in blkif_request.operation (RESERVED_1 is not one).
_DIRECT_OPS = frozenset(
    {BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE}
)
_REQUEST_OPS = _DIRECT_OPS | {BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT}
# A response echoes the request's operation; for INDIRECT, backends answer either with
# INDIRECT or with the inner op (Linux blkback uses the inner op), so both are accepted.
_RESPONSE_OPS = _REQUEST_OPS
_KNOWN_STATUSES = frozenset({BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP})

_U8 = (1 << 8) - 1
_U16 = (1 << 16) - 1
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


# --- ABI layouts -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Abi:
    """One blkif ABI: struct sizes and the byte offset of every field (little-endian).

    The x86_32 ABI differs from x86_64 only because i386 aligns uint64_t to 4 bytes, so
    `id` moves from offset 8 to 4 and everything after it shifts; blkif_request_indirect
    gets an explicit `pad` on i386 to stay 64 bytes. Offsets common to both ABIs (the
    leading u8/u16 fields, segment layout, response `operation`/`status`) are still spelt
    out here so that no code guesses a layout. tests/test_header_layout.py compares every
    number with gcc's view of <xen/io/blkif.h> (native and -m32).
    """

    name: str  # the xenstore `protocol` value, XEN_IO_PROTO_ABI_* in protocols.h
    request_size: int  # sizeof(struct blkif_request)
    response_size: int  # sizeof(struct blkif_response)
    discard_size: int  # sizeof(struct blkif_request_discard)
    indirect_size: int  # sizeof(struct blkif_request_indirect)
    entry_size: int  # sizeof(union blkif_sring_entry) = max(request, response)
    # struct blkif_request (READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE)
    req_operation: int
    req_nr_segments: int
    req_handle: int
    req_id: int
    req_sector_number: int
    req_seg: int
    # struct blkif_request_segment (inside a request and in indirect pages)
    segment_size: int
    seg_gref: int
    seg_first_sect: int
    seg_last_sect: int
    # struct blkif_request_discard
    discard_operation: int
    discard_flag: int
    discard_handle: int
    discard_id: int
    discard_sector_number: int
    discard_nr_sectors: int
    # struct blkif_request_indirect
    indirect_operation: int
    indirect_indirect_op: int
    indirect_nr_segments: int
    indirect_id: int
    indirect_sector_number: int
    indirect_handle: int
    indirect_grefs: int
    # struct blkif_response
    rsp_id: int
    rsp_operation: int
    rsp_status: int


X86_64 = Abi(
    name="x86_64-abi",
    request_size=112,
    response_size=16,
    discard_size=32,
    indirect_size=64,
    entry_size=112,
    req_operation=0,
    req_nr_segments=1,
    req_handle=2,
    req_id=8,
    req_sector_number=16,
    req_seg=24,
    segment_size=SEGMENT_SIZE,
    seg_gref=0,
    seg_first_sect=4,
    seg_last_sect=5,
    discard_operation=0,
    discard_flag=1,
    discard_handle=2,
    discard_id=8,
    discard_sector_number=16,
    discard_nr_sectors=24,
    indirect_operation=0,
    indirect_indirect_op=1,
    indirect_nr_segments=2,
    indirect_id=8,
    indirect_sector_number=16,
    indirect_handle=24,
    indirect_grefs=28,
    rsp_id=0,
    rsp_operation=8,
    rsp_status=10,
)

X86_32 = Abi(
    name="x86_32-abi",
    request_size=108,
    response_size=12,
    discard_size=28,
    indirect_size=64,
    entry_size=108,
    req_operation=0,
    req_nr_segments=1,
    req_handle=2,
    req_id=4,
    req_sector_number=12,
    req_seg=20,
    segment_size=SEGMENT_SIZE,
    seg_gref=0,
    seg_first_sect=4,
    seg_last_sect=5,
    discard_operation=0,
    discard_flag=1,
    discard_handle=2,
    discard_id=4,
    discard_sector_number=12,
    discard_nr_sectors=20,
    indirect_operation=0,
    indirect_indirect_op=1,
    indirect_nr_segments=2,
    indirect_id=4,
    indirect_sector_number=12,
    indirect_handle=20,
    indirect_grefs=24,
    rsp_id=0,
    rsp_operation=8,
    rsp_status=10,
)

# Only the x86 ABIs: like Linux blkback on x86, "arm-abi" is an unknown protocol here.
ABIS: dict[str, Abi] = {X86_64.name: X86_64, X86_32.name: X86_32}


def abi_for_protocol(value: str | None) -> Abi:
    """The ABI named by a frontend's xenstore `protocol` key.

    None (key absent) means the backend's native ABI, x86_64 here (blkif.h: "Default
    Value: XEN_IO_PROTO_ABI_NATIVE"; note QEMU on x86 assumes x86_32 instead). Any other
    unknown string, including "arm-abi" on this x86 backend, raises BlkifError rule
    "protocol.unknown".
    """
    if value is None:
        return X86_64
    abi = ABIS.get(value)
    if abi is None:
        raise BlkifError(
            "protocol.unknown", f"frontend protocol {value!r} is not one of {sorted(ABIS)}"
        )
    return abi


# --- The structs, described once per ABI ---------------------------------------------------

# C scalar type -> struct module code (little-endian, standard sizes). The typedefs are
# blkif.h's: blkif_vdev_t is uint16_t, blkif_sector_t uint64_t, grant_ref_t uint32_t.
_CODES = {"uint8_t": "B", "uint16_t": "H", "int16_t": "h", "uint32_t": "I", "uint64_t": "Q"}
_WIDTHS = {"B": 1, "H": 2, "h": 2, "I": 4, "Q": 8}


@dataclasses.dataclass(frozen=True)
class Field:
    """One member of a blkif struct: name, byte offset, C type, element count.

    A member whose type is another struct (blkif_request.seg) has `ctype` "struct ..." and
    `width` the size of one element; scalar members take their width from `ctype`.
    """

    name: str
    offset: int
    ctype: str
    count: int = 1
    width: int = 0  # bytes per element; 0: from ctype

    @property
    def code(self) -> str | None:
        """The struct module code of one element, None for a struct member."""
        return _CODES.get(self.ctype)

    @property
    def element_size(self) -> int:
        return self.width or _WIDTHS[_CODES[self.ctype]]

    @property
    def size(self) -> int:
        return self.count * self.element_size


@dataclasses.dataclass(frozen=True)
class StructLayout:
    """One blkif struct of one ABI: its C name, sizeof, and every member.

    `compile(names, size)` gives the precompiled little-endian struct.Struct reading or
    writing the named members at their offsets (gaps as pad bytes, padded to `size`);
    `c_asserts()` gives C11 `_Static_assert` lines stating the same layout, for any C code
    (a compiled ring loop, the header probe of tests/test_header_layout.py) to check itself
    against <xen/io/blkif.h>.
    """

    c_name: str
    size: int
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field:
        for field in self.fields:
            if field.name == name:
                return field
        raise KeyError(f"{self.c_name} has no member {name}")

    def format(self, names: Sequence[str], size: int | None = None) -> str:
        """The struct format of members `names` at their offsets. ValueError if two
        overlap, a member is a nested struct, or they run past `size`."""
        fmt = "<"
        pos = 0
        for field in sorted((self.field(n) for n in names), key=lambda f: f.offset):
            if field.code is None:
                raise ValueError(f"{self.c_name}.{field.name} is a {field.ctype}, not a scalar")
            if field.offset < pos:
                raise ValueError(f"{self.c_name}.{field.name} at {field.offset} overlaps the member ending at {pos}")
            if field.offset > pos:
                fmt += f"{field.offset - pos}x"
            fmt += (f"{field.count}" if field.count > 1 else "") + field.code
            pos = field.offset + field.size
        if size is not None:
            if size < pos:
                raise ValueError(f"{self.c_name}: members end at {pos}, past size {size}")
            if size > pos:
                fmt += f"{size - pos}x"
        return fmt

    def compile(self, names: Sequence[str] | None = None, size: int | None = None) -> struct.Struct:
        """A precompiled Struct of members `names` (default: every scalar member)."""
        if names is None:
            names = [f.name for f in self.fields if f.code is not None]
        return struct.Struct(self.format(names, size))

    def c_asserts(self) -> list[str]:
        """C11 static assertions of sizeof, every offsetof and every member's size."""
        name = self.c_name
        lines = [f'_Static_assert(sizeof({name}) == {self.size}, "sizeof({name})");']
        for f in self.fields:
            lines.append(
                f"_Static_assert(offsetof({name}, {f.name}) == {f.offset},"
                f' "offsetof({name}, {f.name})");'
            )
            lines.append(
                f"_Static_assert(sizeof((({name} *)0)->{f.name}) == {f.size},"
                f' "sizeof({name}.{f.name})");'
            )
        return lines


# Every blkif struct: (C name, Abi size attribute, Abi offset prefix, members). A member is
# (name, C type[, count[, Abi offset attribute]]); its offset is getattr(abi, prefix_name)
# unless the attribute is given. The numbers live in the Abi objects above.
_STRUCTS: tuple[tuple[str, str, str, tuple[tuple, ...]], ...] = (
    ("blkif_request_segment", "segment_size", "seg",
     (("gref", "uint32_t"), ("first_sect", "uint8_t"), ("last_sect", "uint8_t"))),
    ("blkif_request", "request_size", "req",
     (("operation", "uint8_t"), ("nr_segments", "uint8_t"), ("handle", "uint16_t"), ("id", "uint64_t"),
      ("sector_number", "uint64_t"),
      ("seg", "struct blkif_request_segment", BLKIF_MAX_SEGMENTS_PER_REQUEST))),
    ("blkif_request_discard", "discard_size", "discard",
     (("operation", "uint8_t"), ("flag", "uint8_t"), ("handle", "uint16_t"), ("id", "uint64_t"),
      ("sector_number", "uint64_t"), ("nr_sectors", "uint64_t"))),
    ("blkif_request_indirect", "indirect_size", "indirect",
     (("operation", "uint8_t"), ("indirect_op", "uint8_t"), ("nr_segments", "uint16_t"), ("id", "uint64_t"),
      ("sector_number", "uint64_t"), ("handle", "uint16_t"),
      ("indirect_grefs", "uint32_t", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, "indirect_grefs"))),
    ("blkif_response", "response_size", "rsp",
     (("id", "uint64_t"), ("operation", "uint8_t"), ("status", "int16_t"))),
)


def layouts_for(abi: Abi) -> dict[str, StructLayout]:
    """Every blkif struct of `abi`, keyed by its C name without "struct "."""
    layouts = {}
    for name, size_attr, prefix, members in _STRUCTS:
        fields = []
        for member in members:
            field_name, ctype = member[0], member[1]
            count = member[2] if len(member) > 2 else 1
            offset = getattr(abi, member[3] if len(member) > 3 else f"{prefix}_{field_name}")
            width = abi.segment_size if ctype == "struct blkif_request_segment" else 0
            fields.append(Field(field_name, offset, ctype, count, width))
        layouts[name] = StructLayout(f"struct {name}", getattr(abi, size_attr), tuple(fields))
    return layouts


class SlotCodec:
    """The blkif structs of one ABI, precompiled from `layouts_for(abi)`: what the frontend,
    the backend and the validators read and write ring slots with.

    Structs (each one pack or unpack per slot; request structs padded to the whole
    struct blkif_request so a request fills its slot and leaves nothing stale, XSA-216):
    - `request_header`: operation, nr_segments, handle, id, sector_number of blkif_request
      (the segments follow at `seg_offset`, `segment_size` bytes each);
    - `segment`: gref, first_sect, last_sect (the same in a request and in indirect pages);
    - `discard`: operation, flag, handle, id, sector_number, nr_sectors;
    - `indirect`: operation, indirect_op, nr_segments, id, sector_number, handle, and the
      8 indirect_grefs;
    - `response`: id, operation, status, padded to sizeof(struct blkif_response);
    - `request_id`: the id of any request kind (the same offset in all of them).
    Use `codec_for(abi)`: one instance per ABI.
    """

    def __init__(self, abi: Abi) -> None:
        self.abi = abi
        self.layouts = layouts = layouts_for(abi)
        request = layouts["blkif_request"]
        segment = layouts["blkif_request_segment"]
        self.request_size = abi.request_size
        self.response_size = abi.response_size
        self.seg_offset = abi.req_seg
        self.segment_size = abi.segment_size
        self.request_header = request.compile(
            ["operation", "nr_segments", "handle", "id", "sector_number"], abi.req_seg
        )
        self.segment = segment.compile(size=abi.segment_size)
        self.discard = layouts["blkif_request_discard"].compile(size=abi.request_size)
        self.indirect = layouts["blkif_request_indirect"].compile(size=abi.request_size)
        self.response = layouts["blkif_response"].compile(size=abi.response_size)
        self.request_id = request.compile(["id"])
        # Columns of a packed segment array: every first_sect (or last_sect) byte is one slice.
        self.first_sect_at = abi.seg_first_sect
        self.last_sect_at = abi.seg_last_sect
        if abi.seg_gref != 0 or abi.segment_size != 8:
            raise ValueError("segment_grefs assumes gref at 0 in an 8-byte segment")

    # -- requests (frontend) ------------------------------------------------------------------

    def rw_request(
        self, operation: int, handle: int, req_id: int, sector: int, segments: bytes | bytearray, nr_segments: int
    ) -> bytearray:
        """A READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE request slot; `segments` holds
        nr_segments packed struct blkif_request_segment. No range checks (encode_request
        makes them): the caller built the values."""
        buf = bytearray(self.request_size)
        self.request_header.pack_into(buf, 0, operation, nr_segments, handle, req_id, sector)
        if nr_segments:
            buf[self.seg_offset : self.seg_offset + self.segment_size * nr_segments] = segments
        return buf

    def indirect_request(
        self, indirect_op: int, handle: int, req_id: int, sector: int, nr_segments: int, grefs: Sequence[int]
    ) -> bytes:
        """A struct blkif_request_indirect slot; unused indirect_grefs are zero."""
        padded = list(grefs) + [0] * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs))
        return self.indirect.pack(BLKIF_OP_INDIRECT, indirect_op, nr_segments, req_id, sector, handle, *padded)

    def discard_request(self, handle: int, req_id: int, sector: int, nr_sectors: int, secure: bool) -> bytes:
        """A struct blkif_request_discard slot."""
        flag = BLKIF_DISCARD_SECURE if secure else 0
        return self.discard.pack(BLKIF_OP_DISCARD, flag, handle, req_id, sector, nr_sectors)

    def pack_segments(self, segments: Sequence[tuple[int, int, int]]) -> bytes:
        """(gref, first_sect, last_sect) triples as a packed segment array."""
        pack = self.segment.pack
        return b"".join(pack(gref, first, last) for gref, first, last in segments)

    # -- requests (backend) ---------------------------------------------------------------------

    def header(self, slot: bytes | bytearray | memoryview) -> tuple[int, int, int]:
        """(operation, id, operation to echo) of any request slot, valid or not: a backend
        answers even a request it cannot decode (for INDIRECT with a READ/WRITE inner op
        the inner op is echoed, as Linux blkback does)."""
        op = slot[self.abi.req_operation]
        rsp_op = op
        if op == BLKIF_OP_INDIRECT:
            inner = slot[self.abi.indirect_indirect_op]
            if inner == BLKIF_OP_READ or inner == BLKIF_OP_WRITE:
                rsp_op = inner
        return op, self.request_id.unpack_from(slot)[0], rsp_op

    @staticmethod
    def segment_grefs(raw: bytes, nr_segments: int) -> tuple[int, ...]:
        """The gref column of nr_segments packed segments (gref is the first u32 of each
        8-byte segment on both ABIs; the constructor checks that)."""
        return struct.unpack(f"<{2 * nr_segments}I", raw)[::2]

    # -- responses -------------------------------------------------------------------------------

    def response_bytes(self, req_id: int, operation: int, status: int) -> bytes:
        """A struct blkif_response, padding zero (XSA-216)."""
        return self.response.pack(req_id, operation, status)


_CODECS: dict[str, SlotCodec] = {}


def codec_for(abi: Abi) -> SlotCodec:
    """The SlotCodec of `abi` (built once per ABI)."""
    codec = _CODECS.get(abi.name)
    if codec is not None and codec.abi is abi:
        return codec
    codec = SlotCodec(abi)
    if ABIS.get(abi.name) == abi:
        _CODECS[abi.name] = codec
    return codec


# --- Field checks --------------------------------------------------------------------------


def _check_uint(rule: str, value: object, maximum: int) -> None:
    # bool is an int subclass; a True sector number is a caller bug, not a value.
    if type(value) is not int or not 0 <= value <= maximum:
        raise BlkifError(rule, f"{value!r} is not an integer in 0..{maximum}")


def _check_op(rule: str, value: object, allowed: frozenset[int]) -> None:
    if type(value) is not int or value not in allowed:
        raise BlkifError(rule, f"operation {value!r} is not one of {sorted(allowed)}")


# --- Messages --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
    """struct blkif_request_segment: sectors first_sect..last_sect (inclusive) of one granted frame.

    Rules: "segment.gref" (u32), "segment.last_sect" (last_sect < 8, inside the 4 KiB
    frame), "segment.first_sect" (first_sect <= last_sect).
    """

    gref: int
    first_sect: int
    last_sect: int

    def __post_init__(self) -> None:
        _check_uint("segment.gref", self.gref, _U32)
        _check_uint("segment.last_sect", self.last_sect, _U8)
        _check_uint("segment.first_sect", self.first_sect, _U8)
        if self.last_sect >= SECTORS_PER_PAGE:
            raise BlkifError(
                "segment.last_sect",
                f"last_sect {self.last_sect} is not below {SECTORS_PER_PAGE} (outside the frame)",
            )
        if self.first_sect > self.last_sect:
            raise BlkifError(
                "segment.first_sect", f"first_sect {self.first_sect} > last_sect {self.last_sect}"
            )

    @property
    def nr_sectors(self) -> int:
        """Number of 512-byte sectors this segment transfers (1..8)."""
        return self.last_sect - self.first_sect + 1

    @property
    def offset(self) -> int:
        """Byte offset of the first sector inside the granted frame."""
        return self.first_sect * SECTOR_SIZE

    @property
    def nr_bytes(self) -> int:
        """Number of bytes this segment transfers."""
        return self.nr_sectors * SECTOR_SIZE


@dataclasses.dataclass(frozen=True)
class Request:
    """struct blkif_request for READ, WRITE, WRITE_BARRIER and FLUSH_DISKCACHE.

    `nr_segments` is derived from `segments`. Rules: "request.op" (one of the four ops),
    "request.handle" (u16), "request.id" (u64), "request.sector_number" (u64),
    "request.segments" (a tuple of Segment), "request.nr_segments" (READ/WRITE: 1..11,
    as Linux blkback rejects a data request without data; WRITE_BARRIER/FLUSH_DISKCACHE:
    0..11, they may carry data).
    """

    operation: int
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        _check_op("request.op", self.operation, _DIRECT_OPS)
        _check_uint("request.handle", self.handle, _U16)
        _check_uint("request.id", self.id, _U64)
        _check_uint("request.sector_number", self.sector_number, _U64)
        if not isinstance(self.segments, tuple) or not all(
            isinstance(s, Segment) for s in self.segments
        ):
            raise BlkifError("request.segments", "segments must be a tuple of Segment")
        _check_nr_segments(self.operation, len(self.segments))

    @property
    def nr_segments(self) -> int:
        """Number of direct segments (0..11)."""
        return len(self.segments)

    @property
    def nr_sectors(self) -> int:
        """Total 512-byte sectors carried by the segments."""
        return sum(s.nr_sectors for s in self.segments)

    @property
    def nr_bytes(self) -> int:
        """Total bytes carried by the segments."""
        return self.nr_sectors * SECTOR_SIZE


def _check_nr_segments(operation: int, nr_segments: int) -> None:
    minimum = 1 if operation in (BLKIF_OP_READ, BLKIF_OP_WRITE) else 0
    if not minimum <= nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise BlkifError(
            "request.nr_segments",
            f"nr_segments {nr_segments} not in {minimum}..{BLKIF_MAX_SEGMENTS_PER_REQUEST}"
            f" for operation {operation}",
        )


@dataclasses.dataclass(frozen=True)
class DiscardRequest:
    """struct blkif_request_discard: discard nr_sectors sectors from sector_number.

    `secure` is the BLKIF_DISCARD_SECURE flag (the backend ignores it unless it wrote
    discard-secure=1). Rules: "discard.handle" (u16), "discard.id" (u64),
    "discard.sector_number" (u64), "discard.nr_sectors" (u64), "discard.range" (the range
    must not run past sector 2**64), "discard.secure" (a bool); on decode also
    "discard.flag" (blkif.h: the flag is BLKIF_DISCARD_SECURE or zero).
    """

    operation: ClassVar[int] = BLKIF_OP_DISCARD

    handle: int
    id: int
    sector_number: int
    nr_sectors: int
    secure: bool = False

    def __post_init__(self) -> None:
        _check_uint("discard.handle", self.handle, _U16)
        _check_uint("discard.id", self.id, _U64)
        _check_uint("discard.sector_number", self.sector_number, _U64)
        _check_uint("discard.nr_sectors", self.nr_sectors, _U64)
        if type(self.secure) is not bool:
            raise BlkifError("discard.secure", f"secure must be a bool, not {self.secure!r}")
        if self.sector_number + self.nr_sectors > _U64 + 1:
            raise BlkifError(
                "discard.range",
                f"sector_number {self.sector_number} + nr_sectors {self.nr_sectors}"
                " runs past sector 2**64",
            )


@dataclasses.dataclass(frozen=True)
class IndirectRequest:
    """struct blkif_request_indirect: a READ or WRITE whose segments live in granted pages.

    Each page named in `indirect_grefs` holds up to 512 struct blkif_request_segment; the
    segments themselves are decoded separately by `decode_indirect_segments` once the pages
    are mapped. Rules: "indirect.op" (READ or WRITE), "indirect.handle" (u16),
    "indirect.id" (u64), "indirect.sector_number" (u64), "indirect.nr_segments"
    (1..4096), "indirect.grefs" (a tuple of ceil(nr_segments / 512) u32 grant refs).
    Whether nr_segments is within the backend's feature-max-indirect-segments is the
    backend's check.
    """

    operation: ClassVar[int] = BLKIF_OP_INDIRECT

    indirect_op: int
    handle: int
    id: int
    sector_number: int
    nr_segments: int
    indirect_grefs: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_op("indirect.op", self.indirect_op, frozenset({BLKIF_OP_READ, BLKIF_OP_WRITE}))
        _check_uint("indirect.handle", self.handle, _U16)
        _check_uint("indirect.id", self.id, _U64)
        _check_uint("indirect.sector_number", self.sector_number, _U64)
        _check_indirect_nr_segments(self.nr_segments)
        if not isinstance(self.indirect_grefs, tuple):
            raise BlkifError("indirect.grefs", "indirect_grefs must be a tuple")
        for gref in self.indirect_grefs:
            _check_uint("indirect.grefs", gref, _U32)
        if len(self.indirect_grefs) != self.nr_pages:
            raise BlkifError(
                "indirect.grefs",
                f"{len(self.indirect_grefs)} indirect grefs for {self.nr_segments} segments"
                f" (need {self.nr_pages})",
            )

    @property
    def nr_pages(self) -> int:
        """Number of indirect pages: ceil(nr_segments / 512)."""
        return indirect_pages_for(self.nr_segments)


def _check_indirect_nr_segments(nr_segments: object) -> None:
    if type(nr_segments) is not int or not 1 <= nr_segments <= BLKIF_MAX_INDIRECT_SEGMENTS:
        raise BlkifError(
            "indirect.nr_segments",
            f"nr_segments {nr_segments!r} not in 1..{BLKIF_MAX_INDIRECT_SEGMENTS}",
        )


def indirect_pages_for(nr_segments: int) -> int:
    """Number of indirect pages that hold nr_segments segments (ceil(n / 512))."""
    return -(-nr_segments // SEGS_PER_INDIRECT_FRAME)


AnyRequest = Request | DiscardRequest | IndirectRequest


@dataclasses.dataclass(frozen=True)
class RequestHeader:
    """The two fields every request kind shares: operation and id.

    A backend that cannot decode a request still answers it (Linux blkback answers an
    unknown operation with BLKIF_RSP_EOPNOTSUPP and a malformed one with BLKIF_RSP_ERROR),
    echoing these two values; `decode_request_header` gives them without judging the rest.
    """

    operation: int
    id: int


@dataclasses.dataclass(frozen=True)
class Response:
    """struct blkif_response: the answer to the request with the same `id`.

    Rules: "response.id" (u64), "response.op" (u8 when built; on decode one of the
    BLKIF_OP_* a frontend can send), "response.status" (s16). Building accepts any u8
    operation so a backend can echo an unknown request operation with
    BLKIF_RSP_EOPNOTSUPP, as Linux blkback does; a frontend never sent such an operation,
    so it rejects one on decode (XSA-376: do not trust the backend). A status outside
    OKAY/ERROR/EOPNOTSUPP is a valid s16 and is decoded; `status_known` tells.
    """

    id: int
    operation: int
    status: int

    def __post_init__(self) -> None:
        _check_uint("response.id", self.id, _U64)
        _check_uint("response.op", self.operation, _U8)
        if type(self.status) is not int or not -(1 << 15) <= self.status < (1 << 15):
            raise BlkifError("response.status", f"status {self.status!r} is not an s16")

    @property
    def status_known(self) -> bool:
        """True when status is BLKIF_RSP_OKAY, BLKIF_RSP_ERROR or BLKIF_RSP_EOPNOTSUPP."""
        return self.status in _KNOWN_STATUSES

    @property
    def ok(self) -> bool:
        """True when status is BLKIF_RSP_OKAY."""
        return self.status == BLKIF_RSP_OKAY


# --- Encoding and decoding ---------------------------------------------------------------------


def _private_copy(
    data: bytes | bytearray | memoryview, size: int, rule: str, what: str
) -> bytes:
    """One copy of the first `size` bytes (XSA-155): every field is then read from the copy."""
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B" or not view.c_contiguous:
        view = memoryview(view.tobytes())  # rare shapes: flatten to plain bytes first
    if view.nbytes < size:
        raise BlkifError(rule, f"{view.nbytes} bytes is shorter than a {size}-byte {what}")
    return bytes(view[:size])


def _unpack_segments(codec: SlotCodec, buf: bytes, offset: int, count: int) -> tuple[Segment, ...]:
    unpack = codec.segment.unpack_from
    size = codec.segment_size
    return tuple(Segment(*unpack(buf, offset + i * size)) for i in range(count))


def encode_request(req: AnyRequest, abi: Abi) -> bytes:
    """The bytes of `req` in `abi`: exactly abi.request_size bytes, every unused byte zero.

    A discard or indirect request is shorter than struct blkif_request; it is zero-padded
    to the full request size so that a whole ring slot is written and nothing stale is left.
    """
    codec = codec_for(abi)
    if isinstance(req, Request):
        segments = codec.pack_segments([(g.gref, g.first_sect, g.last_sect) for g in req.segments])
        return bytes(
            codec.rw_request(req.operation, req.handle, req.id, req.sector_number, segments, req.nr_segments)
        )
    if isinstance(req, DiscardRequest):
        return codec.discard_request(req.handle, req.id, req.sector_number, req.nr_sectors, req.secure)
    if isinstance(req, IndirectRequest):
        return codec.indirect_request(
            req.indirect_op, req.handle, req.id, req.sector_number, req.nr_segments, req.indirect_grefs
        )
    raise BlkifError("request.type", f"cannot encode {type(req).__name__} as a blkif request")


def decode_request_header(data: bytes | bytearray | memoryview, abi: Abi) -> RequestHeader:
    """Operation and id of any request, without validating the rest (see RequestHeader).

    Every request kind has `operation` at the same offset and `id` at the same offset
    within one ABI. Raises BlkifError rule "request.length" on a buffer shorter than
    abi.request_size.
    """
    buf = _private_copy(data, abi.request_size, "request.length", "blkif_request")
    operation, req_id, _ = codec_for(abi).header(buf)
    return RequestHeader(operation, req_id)


def decode_request(data: bytes | bytearray | memoryview, abi: Abi) -> AnyRequest:
    """Decode one request slot: a Request, DiscardRequest or IndirectRequest.

    Copies abi.request_size bytes once and reads every field from that copy (XSA-155);
    bytes past the struct are ignored and the input is never written. Segment slots past
    nr_segments and indirect grefs past ceil(nr_segments / 512) are ignored, as a frontend
    may leave stale values there. Raises BlkifError: "request.length" (short buffer),
    "request.op" (unknown or reserved operation), "request.nr_segments", the segment rules,
    "discard.flag", "discard.range", "indirect.op", "indirect.nr_segments".
    """
    buf = _private_copy(data, abi.request_size, "request.length", "blkif_request")
    codec = codec_for(abi)
    operation = buf[abi.req_operation]
    if operation in _DIRECT_OPS:
        _, nr_segments, handle, req_id, sector_number = codec.request_header.unpack_from(buf)
        _check_nr_segments(operation, nr_segments)
        segments = _unpack_segments(codec, buf, codec.seg_offset, nr_segments)
        return Request(operation, handle, req_id, sector_number, segments)
    if operation == BLKIF_OP_DISCARD:
        _, flag, handle, req_id, sector_number, nr_sectors = codec.discard.unpack_from(buf)
        if flag & ~BLKIF_DISCARD_SECURE:
            raise BlkifError(
                "discard.flag", f"flag {flag:#x} is neither 0 nor BLKIF_DISCARD_SECURE"
            )
        return DiscardRequest(handle, req_id, sector_number, nr_sectors, bool(flag))
    if operation == BLKIF_OP_INDIRECT:
        _, indirect_op, nr_segments, req_id, sector_number, handle, *grefs = codec.indirect.unpack_from(buf)
        _check_op("indirect.op", indirect_op, frozenset({BLKIF_OP_READ, BLKIF_OP_WRITE}))
        _check_indirect_nr_segments(nr_segments)
        nr_pages = indirect_pages_for(nr_segments)
        return IndirectRequest(
            indirect_op, handle, req_id, sector_number, nr_segments, tuple(grefs[:nr_pages])
        )
    raise BlkifError("request.op", f"operation {operation} is not a blkif request operation")


def encode_response(rsp: Response, abi: Abi) -> bytes:
    """The bytes of `rsp` in `abi`: exactly abi.response_size bytes, padding zero (XSA-216)."""
    if not isinstance(rsp, Response):
        raise BlkifError(
            "response.type", f"cannot encode {type(rsp).__name__} as a blkif response"
        )
    return codec_for(abi).response_bytes(rsp.id, rsp.operation, rsp.status)


def decode_response(data: bytes | bytearray | memoryview, abi: Abi) -> Response:
    """Decode one response slot (a frontend's view).

    Copies abi.response_size bytes once (XSA-155); trailing bytes are ignored. Raises
    BlkifError "response.length" (short buffer) or "response.op" (not an operation a
    frontend sends). Whether id and operation match a pending request is the frontend's
    check (XSA-376).
    """
    buf = _private_copy(data, abi.response_size, "response.length", "blkif_response")
    rsp_id, operation, status = codec_for(abi).response.unpack_from(buf)
    _check_op("response.op", operation, _RESPONSE_OPS)
    return Response(rsp_id, operation, status)


def encode_indirect_pages(segments: Sequence[Segment]) -> list[bytes]:
    """Indirect pages for `segments`: 512 segments per 4096-byte page, the rest zero.

    Raises BlkifError "indirect.nr_segments" unless 1..4096 segments are given, or
    "indirect.segments" if an element is not a Segment.
    """
    _check_indirect_nr_segments(len(segments))
    # struct blkif_request_segment is the same on both ABIs (tests/test_header_layout.py).
    pack_into = codec_for(X86_64).segment.pack_into
    pages = []
    for start in range(0, len(segments), SEGS_PER_INDIRECT_FRAME):
        page = bytearray(PAGE_SIZE)
        for i, seg in enumerate(segments[start : start + SEGS_PER_INDIRECT_FRAME]):
            if not isinstance(seg, Segment):
                raise BlkifError("indirect.segments", f"{seg!r} is not a Segment")
            pack_into(page, i * SEGMENT_SIZE, seg.gref, seg.first_sect, seg.last_sect)
        pages.append(bytes(page))
    return pages


def decode_indirect_segments(
    pages: Sequence[bytes | bytearray | memoryview], nr_segments: int
) -> tuple[Segment, ...]:
    """The first nr_segments segments held in indirect pages, each validated.

    Each page is copied once (XSA-155; the pages are granted by the frontend and may be
    changed under us). Raises BlkifError: "indirect.nr_segments" (not 1..4096),
    "indirect.pages" (fewer pages than ceil(nr_segments / 512)), "indirect.page_length"
    (a page shorter than the segments it must hold), or a segment rule.
    """
    _check_indirect_nr_segments(nr_segments)
    nr_pages = indirect_pages_for(nr_segments)
    if len(pages) < nr_pages:
        raise BlkifError(
            "indirect.pages", f"{len(pages)} pages given, {nr_segments} segments need {nr_pages}"
        )
    segments: list[Segment] = []
    for index in range(nr_pages):
        count = min(SEGS_PER_INDIRECT_FRAME, nr_segments - index * SEGS_PER_INDIRECT_FRAME)
        page = _private_copy(
            pages[index], count * SEGMENT_SIZE, "indirect.page_length", "indirect page"
        )
        segments.extend(_unpack_segments(codec_for(X86_64), page, 0, count))
    return tuple(segments)
