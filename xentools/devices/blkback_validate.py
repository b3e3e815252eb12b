"""blkback request validation: every rule of blkif.h a backend must judge, as one table.

Owns: `RequestPolicy` (what this connection allows: disk size, sector unit, read-only,
advertised features), `parse_request` and `parse_indirect_segments`
(slot bytes -> a `Plan` of segments and a disk extent, or `RequestRejected`), and the rule
table `RULES` (rule id -> status and meaning), which the conformance report and the tests
share.
Must not: do I/O, map grants, touch a ring, keep state between calls, or describe a blkif
struct: slots are read with xentools.core.blkif.SlotCodec (the one codec). The slot given here
is already the backend's private copy (BackRing.get_request, XSA-155); indirect pages are
copied once here before they are read.

Why not blkif.decode_request on the hot path: it builds a frozen dataclass per segment,
which costs more than the I/O of a 4 KiB request. The rules are the same (the rule ids of
blkif.py are reused, and tests/test_blkback_validate.py checks every rule against the
decoder's verdict); here they are applied to whole byte columns at C speed: all `last_sect`
bytes of a request are one bytes slice, so "every last_sect < 8" is one max().

Status per rule (as Linux blkback answers): an operation this backend does not know or did
not advertise gets BLKIF_RSP_EOPNOTSUPP; everything malformed or out of bounds gets
BLKIF_RSP_ERROR. Nothing here is ever answered OKAY without passing every check.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

from xentools.core.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    PAGE_SIZE,
    SECTOR_SIZE,
    SEGMENT_SIZE,
    SEGS_PER_INDIRECT_FRAME,
    X86_64,
    SlotCodec,
    codec_for,
    indirect_pages_for,
)
from xentools.core.errors import BlkifError, RemoteProtocolError

__all__ = [
    "RULES",
    "Plan",
    "RequestPolicy",
    "RequestRejected",
    "parse_indirect_segments",
    "parse_request",
]

# rule id -> (status, what the rule says). Rules shared with blkif.py keep its ids.
RULES: dict[str, tuple[int, str]] = {
    "request.op": (BLKIF_RSP_EOPNOTSUPP, "operation is not a blkif request operation"),
    "request.nr_segments": (BLKIF_RSP_ERROR, "READ/WRITE carry 1..11 segments, flush/barrier 0..11"),
    "request.beyond_disk": (BLKIF_RSP_ERROR, "sector_number + sectors runs past the disk"),
    "request.readonly_write": (BLKIF_RSP_ERROR, "a write, discard or flush with data on a read-only disk"),
    "request.flush_not_advertised": (BLKIF_RSP_EOPNOTSUPP, "FLUSH_DISKCACHE without feature-flush-cache"),
    "request.barrier_not_advertised": (BLKIF_RSP_EOPNOTSUPP, "WRITE_BARRIER without feature-barrier"),
    "segment.last_sect": (BLKIF_RSP_ERROR, "last_sect must lie inside the 4 KiB frame"),
    "segment.first_sect": (BLKIF_RSP_ERROR, "first_sect must not exceed last_sect"),
    "segment.gref_unmappable": (BLKIF_RSP_ERROR, "a data segment's grant ref cannot be mapped"),
    "discard.not_advertised": (BLKIF_RSP_EOPNOTSUPP, "DISCARD without feature-discard"),
    "discard.secure_not_advertised": (BLKIF_RSP_EOPNOTSUPP, "BLKIF_DISCARD_SECURE without discard-secure"),
    "discard.flag": (BLKIF_RSP_ERROR, "discard flag is neither 0 nor BLKIF_DISCARD_SECURE"),
    "discard.range": (BLKIF_RSP_ERROR, "sector_number + nr_sectors runs past sector 2**64"),
    "discard.beyond_disk": (BLKIF_RSP_ERROR, "discard range runs past the disk"),
    "indirect.not_advertised": (BLKIF_RSP_EOPNOTSUPP, "INDIRECT without feature-max-indirect-segments"),
    "indirect.op": (BLKIF_RSP_ERROR, "indirect_op must be READ or WRITE"),
    "indirect.nr_segments": (BLKIF_RSP_ERROR, "indirect nr_segments must be 1..4096"),
    "indirect.too_many_segments": (BLKIF_RSP_ERROR, "more segments than feature-max-indirect-segments"),
    "indirect.gref_unmappable": (BLKIF_RSP_ERROR, "an indirect page's grant ref cannot be mapped"),
}

_DATA_OPS = (BLKIF_OP_READ, BLKIF_OP_WRITE)
# Indirect pages hold struct blkif_request_segment, whose layout is the same on both ABIs.
_INDIRECT_PAGE = codec_for(X86_64)
_GT = operator.gt


class RequestRejected(BlkifError, RemoteProtocolError):
    """The frontend's request breaks a rule: the backend answers it without doing its I/O.

    `rule` is a key of RULES; `status` is BLKIF_RSP_ERROR or BLKIF_RSP_EOPNOTSUPP.
    """

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(rule, detail)
        self.status = RULES[rule][0]


@dataclass(frozen=True)
class RequestPolicy:
    """What one connection allows.

    `disk_bytes` is the image size. `unit` is the size in bytes of one wire sector: 512, or
    the disk's sector-size when the frontend wrote feature-large-sector-size=1 (blkif.h: then
    first_sect, last_sect and sector_number all count sector-size units). The other fields
    mirror what the backend advertised; `max_indirect_segments` 0 means no indirect requests.
    """

    disk_bytes: int
    unit: int = SECTOR_SIZE
    readonly: bool = False
    max_indirect_segments: int = 0
    flush_cache: bool = True
    barrier: bool = True
    discard: bool = False
    discard_secure: bool = False

    def __post_init__(self) -> None:
        if self.unit < SECTOR_SIZE or self.unit > PAGE_SIZE or self.unit & (self.unit - 1):
            raise ValueError(f"unit {self.unit} is not a power of two in 512..4096")
        if not 0 <= self.max_indirect_segments <= BLKIF_MAX_INDIRECT_SEGMENTS:
            raise ValueError(f"max_indirect_segments {self.max_indirect_segments} not in 0..4096")

    @property
    def units_per_page(self) -> int:
        """Wire sectors in one 4 KiB frame: last_sect must stay below this."""
        return PAGE_SIZE // self.unit


class Plan(NamedTuple):
    """A request that passed the checks known so far.

    `operation` is what to do (READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE, DISCARD, or
    INDIRECT while its segments still sit in unmapped indirect pages); `rsp_operation` is the
    operation to echo (for INDIRECT the inner op, as Linux blkback answers). Data requests
    carry `grefs`, `firsts`, `lasts` (one entry per segment, in wire units), `offset` and
    `nbytes` (the disk extent in bytes). DISCARD uses `offset`/`nbytes` only. An INDIRECT
    plan carries `indirect_grefs` and `nr_segments` until parse_indirect_segments fills
    in the segments.
    """

    operation: int
    rsp_operation: int
    id: int
    offset: int
    nbytes: int
    grefs: tuple[int, ...] = ()
    firsts: bytes = b""
    lasts: bytes = b""
    indirect_grefs: tuple[int, ...] = ()
    nr_segments: int = 0


def _check_segments(firsts: bytes, lasts: bytes, policy: RequestPolicy, where: str) -> None:
    per_page = policy.units_per_page
    if lasts and max(lasts) >= per_page:
        index = next(i for i, last in enumerate(lasts) if last >= per_page)
        raise RequestRejected(
            "segment.last_sect",
            f"{where} segment {index}: last_sect {lasts[index]} is not below {per_page}"
            f" ({policy.unit}-byte sectors in a 4 KiB frame)",
        )
    if any(map(_GT, firsts, lasts)):
        index = next(i for i, (f, last) in enumerate(zip(firsts, lasts)) if f > last)
        raise RequestRejected(
            "segment.first_sect",
            f"{where} segment {index}: first_sect {firsts[index]} > last_sect {lasts[index]}",
        )


def _extent(sector: int, nr_units: int, policy: RequestPolicy, rule: str, req_id: int) -> tuple[int, int]:
    offset = sector * policy.unit
    nbytes = nr_units * policy.unit
    if offset + nbytes > policy.disk_bytes:
        raise RequestRejected(
            rule,
            f"request {req_id}: sectors {sector}..+{nr_units} ({policy.unit}-byte) run past the"
            f" disk of {policy.disk_bytes // policy.unit} sectors",
        )
    return offset, nbytes


def parse_request(slot: bytes, codec: SlotCodec, policy: RequestPolicy) -> Plan:
    """Judge one request slot (the backend's private copy). Returns a Plan, or raises
    RequestRejected naming the first rule broken. An INDIRECT plan still needs
    parse_indirect_segments once its indirect pages are mapped."""
    op = slot[0]
    if op in _DATA_OPS or op == BLKIF_OP_WRITE_BARRIER or op == BLKIF_OP_FLUSH_DISKCACHE:
        _, nr_segments, _, req_id, sector = codec.request_header.unpack_from(slot)
        if op == BLKIF_OP_FLUSH_DISKCACHE and not policy.flush_cache:
            raise RequestRejected("request.flush_not_advertised", f"request {req_id}: flush")
        if op == BLKIF_OP_WRITE_BARRIER and not policy.barrier:
            raise RequestRejected("request.barrier_not_advertised", f"request {req_id}: barrier")
        minimum = 1 if op in _DATA_OPS else 0
        if not minimum <= nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise RequestRejected(
                "request.nr_segments",
                f"request {req_id}: nr_segments {nr_segments} not in"
                f" {minimum}..{BLKIF_MAX_SEGMENTS_PER_REQUEST} for operation {op}",
            )
        if policy.readonly and op != BLKIF_OP_READ and nr_segments:
            raise RequestRejected("request.readonly_write", f"request {req_id}: operation {op} writes")
        if not nr_segments:
            return Plan(op, op, req_id, 0, 0)
        raw = slot[codec.seg_offset : codec.seg_offset + nr_segments * SEGMENT_SIZE]
        return _data_plan(codec, op, op, req_id, sector, raw, nr_segments, policy, "direct")
    if op == BLKIF_OP_DISCARD:
        _, flag, _, req_id, sector, nr_sectors = codec.discard.unpack_from(slot)
        if not policy.discard:
            raise RequestRejected("discard.not_advertised", f"request {req_id}: discard")
        if flag & ~BLKIF_DISCARD_SECURE:
            raise RequestRejected("discard.flag", f"request {req_id}: flag {flag:#x}")
        if policy.readonly:
            raise RequestRejected("request.readonly_write", f"request {req_id}: discard")
        if flag and not policy.discard_secure:
            # Answering OKAY would promise an erasure this backend cannot make.
            raise RequestRejected("discard.secure_not_advertised", f"request {req_id}: secure discard")
        if sector + nr_sectors > 1 << 64:
            raise RequestRejected(
                "discard.range", f"request {req_id}: {sector} + {nr_sectors} runs past sector 2**64"
            )
        offset, nbytes = _extent(sector, nr_sectors, policy, "discard.beyond_disk", req_id)
        return Plan(op, op, req_id, offset, nbytes)
    if op == BLKIF_OP_INDIRECT:
        _, inner, nr_segments, req_id, sector, _, *grefs = codec.indirect.unpack_from(slot)
        if not policy.max_indirect_segments:
            raise RequestRejected("indirect.not_advertised", f"request {req_id}: indirect")
        if inner not in _DATA_OPS:
            raise RequestRejected("indirect.op", f"request {req_id}: indirect_op {inner}")
        if not 1 <= nr_segments <= BLKIF_MAX_INDIRECT_SEGMENTS:
            raise RequestRejected(
                "indirect.nr_segments", f"request {req_id}: nr_segments {nr_segments} not in 1..4096"
            )
        if nr_segments > policy.max_indirect_segments:
            raise RequestRejected(
                "indirect.too_many_segments",
                f"request {req_id}: {nr_segments} segments, feature-max-indirect-segments is"
                f" {policy.max_indirect_segments}",
            )
        if policy.readonly and inner == BLKIF_OP_WRITE:
            raise RequestRejected("request.readonly_write", f"request {req_id}: indirect write")
        pages = indirect_pages_for(nr_segments)
        # `sector` rides in `offset` (in wire units) until the segments are known.
        return Plan(
            BLKIF_OP_INDIRECT, inner, req_id, sector, 0,
            indirect_grefs=tuple(grefs[:pages]), nr_segments=nr_segments,
        )
    raise RequestRejected("request.op", f"operation {op} is not a blkif request operation")


def _data_plan(
    codec: SlotCodec, op: int, rsp_op: int, req_id: int, sector: int, raw: bytes, n: int,
    policy: RequestPolicy, where: str,
) -> Plan:
    firsts = raw[codec.first_sect_at :: SEGMENT_SIZE]
    lasts = raw[codec.last_sect_at :: SEGMENT_SIZE]
    _check_segments(firsts, lasts, policy, f"request {req_id} {where}")
    units = sum(lasts) - sum(firsts) + n
    offset, nbytes = _extent(sector, units, policy, "request.beyond_disk", req_id)
    grefs = codec.segment_grefs(raw, n)
    return Plan(op, rsp_op, req_id, offset, nbytes, grefs, firsts, lasts)


def parse_indirect_segments(plan: Plan, pages: list[memoryview] | list[bytes], policy: RequestPolicy) -> Plan:
    """The data plan of an INDIRECT plan, from its mapped indirect pages.

    Each page is copied once before it is read (XSA-155: the frontend may rewrite it while
    we look). Raises RequestRejected for a bad segment or a range past the disk.
    """
    n = plan.nr_segments
    if len(pages) != len(plan.indirect_grefs):
        raise ValueError("one mapped page per indirect gref is needed")
    parts = []
    left = n
    for page in pages:
        count = min(left, SEGS_PER_INDIRECT_FRAME)
        parts.append(bytes(page[: count * SEGMENT_SIZE]))
        left -= count
    raw = b"".join(parts) if len(parts) > 1 else parts[0]
    return _data_plan(_INDIRECT_PAGE, plan.rsp_operation, plan.rsp_operation, plan.id, plan.offset, raw, n, policy, "indirect")
