"""Compare xentools.core.blkif.Abi and the ring constants with gcc's view of the Xen headers.

A small C probe #includes <xen/io/blkif.h> and <xen/io/protocols.h> and prints sizeof and
offsetof of every field the Abi objects describe, the blkif_sring header, the ring sizes
the __CONST_RING_SIZE macro gives for 4096 << order bytes, and the blkif.h constants. It is
built natively (x86_64 ABI) and with -m32 (under -m32 blkif.h describes the native 32-bit
structs, which is the x86_32 ABI). A missing gcc, header or 32-bit toolchain FAILS the test:
these numbers are the ground truth, not an optional extra.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess

import pytest

from xentools.core import blkif, ring
from xentools.core.blkif import X86_32, X86_64, Abi

# (Abi attribute, C expression) for every size and offset an Abi holds.
_ABI_FIELDS = [
    ("request_size", "sizeof(struct blkif_request)"),
    ("response_size", "sizeof(struct blkif_response)"),
    ("discard_size", "sizeof(struct blkif_request_discard)"),
    ("indirect_size", "sizeof(struct blkif_request_indirect)"),
    ("entry_size", "sizeof(union blkif_sring_entry)"),
    ("req_operation", "offsetof(struct blkif_request, operation)"),
    ("req_nr_segments", "offsetof(struct blkif_request, nr_segments)"),
    ("req_handle", "offsetof(struct blkif_request, handle)"),
    ("req_id", "offsetof(struct blkif_request, id)"),
    ("req_sector_number", "offsetof(struct blkif_request, sector_number)"),
    ("req_seg", "offsetof(struct blkif_request, seg)"),
    ("segment_size", "sizeof(struct blkif_request_segment)"),
    ("seg_gref", "offsetof(struct blkif_request_segment, gref)"),
    ("seg_first_sect", "offsetof(struct blkif_request_segment, first_sect)"),
    ("seg_last_sect", "offsetof(struct blkif_request_segment, last_sect)"),
    ("discard_operation", "offsetof(struct blkif_request_discard, operation)"),
    ("discard_flag", "offsetof(struct blkif_request_discard, flag)"),
    ("discard_handle", "offsetof(struct blkif_request_discard, handle)"),
    ("discard_id", "offsetof(struct blkif_request_discard, id)"),
    ("discard_sector_number", "offsetof(struct blkif_request_discard, sector_number)"),
    ("discard_nr_sectors", "offsetof(struct blkif_request_discard, nr_sectors)"),
    ("indirect_operation", "offsetof(struct blkif_request_indirect, operation)"),
    ("indirect_indirect_op", "offsetof(struct blkif_request_indirect, indirect_op)"),
    ("indirect_nr_segments", "offsetof(struct blkif_request_indirect, nr_segments)"),
    ("indirect_id", "offsetof(struct blkif_request_indirect, id)"),
    ("indirect_sector_number", "offsetof(struct blkif_request_indirect, sector_number)"),
    ("indirect_handle", "offsetof(struct blkif_request_indirect, handle)"),
    ("indirect_grefs", "offsetof(struct blkif_request_indirect, indirect_grefs)"),
    ("rsp_id", "offsetof(struct blkif_response, id)"),
    ("rsp_operation", "offsetof(struct blkif_response, operation)"),
    ("rsp_status", "offsetof(struct blkif_response, status)"),
]

# Integer sizes: a field's width decides the struct format blkif.py packs it with.
_FIELD_WIDTHS = [
    ("req_nr_segments", "sizeof(((struct blkif_request *)0)->nr_segments)", 1),
    ("req_handle", "sizeof(((struct blkif_request *)0)->handle)", 2),
    ("req_id", "sizeof(((struct blkif_request *)0)->id)", 8),
    ("req_sector_number", "sizeof(((struct blkif_request *)0)->sector_number)", 8),
    ("req_seg_count",
     "sizeof(((struct blkif_request *)0)->seg) / sizeof(struct blkif_request_segment)", 11),
    ("seg_gref", "sizeof(((struct blkif_request_segment *)0)->gref)", 4),
    ("discard_nr_sectors", "sizeof(((struct blkif_request_discard *)0)->nr_sectors)", 8),
    ("indirect_nr_segments", "sizeof(((struct blkif_request_indirect *)0)->nr_segments)", 2),
    ("indirect_handle", "sizeof(((struct blkif_request_indirect *)0)->handle)", 2),
    ("indirect_grefs_total", "sizeof(((struct blkif_request_indirect *)0)->indirect_grefs)", 32),
    ("rsp_status", "sizeof(((struct blkif_response *)0)->status)", 2),
    ("rsp_status_signed", "(__typeof__(((struct blkif_response *)0)->status))-1 < 0", 1),
]

_SRING_FIELDS = ["req_prod", "req_event", "rsp_prod", "rsp_event", "pvt", "__pad", "ring"]

_CONSTANTS = [
    "BLKIF_OP_READ", "BLKIF_OP_WRITE", "BLKIF_OP_WRITE_BARRIER", "BLKIF_OP_FLUSH_DISKCACHE",
    "BLKIF_OP_RESERVED_1", "BLKIF_OP_DISCARD", "BLKIF_OP_INDIRECT",
    "BLKIF_RSP_OKAY", "BLKIF_RSP_ERROR", "BLKIF_RSP_EOPNOTSUPP",
    "BLKIF_MAX_SEGMENTS_PER_REQUEST", "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
    "BLKIF_DISCARD_SECURE", "VDISK_CDROM", "VDISK_REMOVABLE", "VDISK_READONLY",
]

_ORDERS = range(0, 5)


def _probe_source() -> str:
    lines = [
        "#include <stdint.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <string.h>",
        "#include <xen/io/blkif.h>",
        "#include <xen/io/protocols.h>",
        "int main(void) {",
        '    printf("native_protocol %s\\n", XEN_IO_PROTO_ABI_NATIVE);',
    ]
    for name, expr in _ABI_FIELDS:
        lines.append(f'    printf("abi.{name} %ld\\n", (long)({expr}));')
    for name, expr, _ in _FIELD_WIDTHS:
        lines.append(f'    printf("width.{name} %ld\\n", (long)({expr}));')
    for field in _SRING_FIELDS:
        lines.append(
            f'    printf("sring.{field} %ld\\n", (long)offsetof(struct blkif_sring, {field}));'
        )
    lines.append('    printf("sring.idx_size %ld\\n", (long)sizeof(RING_IDX));')
    for order in _ORDERS:
        lines.append(
            f'    printf("ring.{order} %ld\\n", (long)__CONST_RING_SIZE(blkif, 4096 << {order}));'
        )
    for const in _CONSTANTS:
        lines.append(f'    printf("const.{const} %ld\\n", (long)({const}));')
    lines += _C_SAMPLES + ["    return 0;", "}", ""]
    return "\n".join(lines)


# C fills one struct of each kind (memset 0 first, so padding is zero) and dumps its bytes:
# blkif.py must decode them to the same values and encode the same values to the same bytes.
_C_SAMPLES = r"""
    {
        union { struct blkif_request r; struct blkif_request_discard d;
                struct blkif_request_indirect i; struct blkif_response p;
                unsigned char b[sizeof(struct blkif_request)]; } u;
        size_t k;
#define DUMP(tag, n) do { printf(tag " "); for (k = 0; k < (n); k++) printf("%02x", u.b[k]); \
                          printf("\n"); } while (0)
        memset(&u, 0, sizeof(u));
        u.r.operation = BLKIF_OP_WRITE; u.r.nr_segments = 2; u.r.handle = 51712;
        u.r.id = 0x8877665544332211ULL; u.r.sector_number = 0x0123456789ULL;
        u.r.seg[0].gref = 0xdeadbeef; u.r.seg[0].first_sect = 1; u.r.seg[0].last_sect = 6;
        u.r.seg[1].gref = 7; u.r.seg[1].first_sect = 0; u.r.seg[1].last_sect = 7;
        DUMP("sample.request", sizeof(struct blkif_request));
        memset(&u, 0, sizeof(u));
        u.d.operation = BLKIF_OP_DISCARD; u.d.flag = BLKIF_DISCARD_SECURE; u.d.handle = 768;
        u.d.id = 42; u.d.sector_number = 1ULL << 40; u.d.nr_sectors = 65536;
        DUMP("sample.discard", sizeof(struct blkif_request));
        memset(&u, 0, sizeof(u));
        u.i.operation = BLKIF_OP_INDIRECT; u.i.indirect_op = BLKIF_OP_READ;
        u.i.nr_segments = 1025; u.i.id = 3; u.i.sector_number = 4; u.i.handle = 5;
        u.i.indirect_grefs[0] = 100; u.i.indirect_grefs[1] = 101; u.i.indirect_grefs[2] = 102;
        DUMP("sample.indirect", sizeof(struct blkif_request));
        memset(&u, 0, sizeof(u));
        u.p.id = 0xfffffffffffffffeULL; u.p.operation = BLKIF_OP_FLUSH_DISKCACHE;
        u.p.status = BLKIF_RSP_EOPNOTSUPP;
        DUMP("sample.response", sizeof(struct blkif_response));
    }
""".splitlines()


def _build_and_run(tmp_path_factory: pytest.TempPathFactory, flags: list[str]) -> dict[str, str]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail(
            "gcc not found: the header layout check needs gcc (apt-get install gcc gcc-multilib)"
        )
    workdir = tmp_path_factory.mktemp("blkif_probe")
    source = workdir / "probe.c"
    source.write_text(_probe_source())
    exe = workdir / "probe"
    build = subprocess.run(
        [gcc, "-std=gnu11", "-Wall", "-Werror", *flags, str(source), "-o", str(exe)],
        capture_output=True, text=True, check=False,
    )
    if build.returncode != 0:
        pytest.fail(
            f"compiling the blkif.h probe with gcc {' '.join(flags)} failed (needs libxen-dev"
            f" and, for -m32, gcc-multilib):\n{build.stderr}"
        )
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    facts = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    return facts


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    return {
        X86_64.name: _build_and_run(tmp_path_factory, []),
        X86_32.name: _build_and_run(tmp_path_factory, ["-m32"]),
    }


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
def test_probe_is_the_abi_it_claims(probes: dict[str, dict[str, str]], abi: Abi) -> None:
    # protocols.h names the native ABI of the build; -m32 must really be i386.
    assert probes[abi.name]["native_protocol"] == abi.name


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
def test_every_abi_size_and_offset_matches_gcc(probes: dict[str, dict[str, str]], abi: Abi) -> None:
    facts = probes[abi.name]
    mismatches = {
        name: (getattr(abi, name), int(facts[f"abi.{name}"]))
        for name, _ in _ABI_FIELDS
        if getattr(abi, name) != int(facts[f"abi.{name}"])
    }
    assert mismatches == {}, f"{abi.name}: (python, gcc) differ: {mismatches}"
    # The probe covers every layout field of Abi (name is the only non-layout field).
    covered = {name for name, _ in _ABI_FIELDS} | {"name"}
    assert {f.name for f in dataclasses.fields(Abi)} == covered


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
def test_field_widths_match_the_struct_formats(probes: dict[str, dict[str, str]], abi: Abi) -> None:
    facts = probes[abi.name]
    for name, _, expected in _FIELD_WIDTHS:
        assert int(facts[f"width.{name}"]) == expected, name
    # The encoder relies on those widths: a u16 handle and s16 status survive a round trip.
    rsp = blkif.Response(id=2**64 - 1, operation=blkif.BLKIF_OP_WRITE, status=-2)
    raw = blkif.encode_response(rsp, abi)
    assert struct.unpack_from("<h", raw, int(facts["abi.rsp_status"]))[0] == -2
    assert struct.unpack_from("<Q", raw, int(facts["abi.rsp_id"]))[0] == 2**64 - 1


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
def test_encoded_request_fields_sit_at_gcc_offsets(
    probes: dict[str, dict[str, str]], abi: Abi
) -> None:
    facts = probes[abi.name]
    req = blkif.Request(
        blkif.BLKIF_OP_WRITE, 0xBEEF, 0x1122334455667788, 0x0102030405060708,
        tuple(blkif.Segment(1000 + i, 1, 6) for i in range(11)),
    )
    raw = blkif.encode_request(req, abi)
    assert len(raw) == int(facts["abi.request_size"])
    assert struct.unpack_from("<H", raw, int(facts["abi.req_handle"]))[0] == 0xBEEF
    assert struct.unpack_from("<Q", raw, int(facts["abi.req_id"]))[0] == 0x1122334455667788
    sector_at = int(facts["abi.req_sector_number"])
    assert struct.unpack_from("<Q", raw, sector_at)[0] == 0x0102030405060708
    last = int(facts["abi.req_seg"]) + 10 * int(facts["abi.segment_size"])
    assert struct.unpack_from("<I", raw, last)[0] == 1010
    ind = blkif.IndirectRequest(blkif.BLKIF_OP_READ, 0xCAFE, 7, 9, 4096, tuple(range(50, 58)))
    raw = blkif.encode_request(ind, abi)
    assert struct.unpack_from("<H", raw, int(facts["abi.indirect_handle"]))[0] == 0xCAFE
    grefs = int(facts["abi.indirect_grefs"])
    assert struct.unpack_from("<8I", raw, grefs) == tuple(range(50, 58))
    dis = blkif.DiscardRequest(3, 4, 5, 6, secure=True)
    raw = blkif.encode_request(dis, abi)
    assert struct.unpack_from("<Q", raw, int(facts["abi.discard_nr_sectors"]))[0] == 6
    assert raw[int(facts["abi.discard_flag"])] == int(facts["const.BLKIF_DISCARD_SECURE"])


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
def test_shared_ring_header_matches_gcc(probes: dict[str, dict[str, str]], abi: Abi) -> None:
    facts = probes[abi.name]
    assert int(facts["sring.idx_size"]) == 4
    assert int(facts["sring.ring"]) == ring.RING_HEADER_SIZE
    # Write each index through SharedRing and read it back at gcc's offset.
    buf = bytearray(4096)
    shared = ring.SharedRing(memoryview(buf), abi.entry_size, ring.ring_entries(0, abi.entry_size))
    values = {"req_prod": 0x11111111, "req_event": 0x22222222,
              "rsp_prod": 0x33333333, "rsp_event": 0x44444444}
    for field, value in values.items():
        setattr(shared, field, value)
    for field, value in values.items():
        assert struct.unpack_from("<I", buf, int(facts[f"sring.{field}"]))[0] == value, field
    # init() zeroes pvt and __pad, exactly the bytes between rsp_event and the ring.
    buf[int(facts["sring.pvt"]) : int(facts["sring.ring"])] = b"\xff" * (
        int(facts["sring.ring"]) - int(facts["sring.pvt"])
    )
    shared.init()
    assert buf[int(facts["sring.pvt"]) : int(facts["sring.ring"])] == bytes(
        int(facts["sring.ring"]) - int(facts["sring.pvt"])
    )
    # Slot i begins at offsetof(ring) + i * sizeof(union blkif_sring_entry).
    assert shared.slot_offset(3) == int(facts["sring.ring"]) + 3 * int(facts["abi.entry_size"])


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
def test_ring_entries_match_const_ring_size(probes: dict[str, dict[str, str]], abi: Abi) -> None:
    facts = probes[abi.name]
    for order in _ORDERS:
        assert ring.ring_entries(order, abi.entry_size) == int(facts[f"ring.{order}"]), order


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
def test_constants_match_blkif_h(probes: dict[str, dict[str, str]], abi: Abi) -> None:
    facts = probes[abi.name]
    for const in _CONSTANTS:
        assert getattr(blkif, const) == int(facts[f"const.{const}"]), const
    assert blkif.SEGS_PER_INDIRECT_FRAME == 4096 // int(facts["abi.segment_size"])


_SAMPLES = {
    "sample.request": blkif.Request(
        blkif.BLKIF_OP_WRITE, 51712, 0x8877665544332211, 0x0123456789,
        (blkif.Segment(0xDEADBEEF, 1, 6), blkif.Segment(7, 0, 7)),
    ),
    "sample.discard": blkif.DiscardRequest(768, 42, 1 << 40, 65536, secure=True),
    "sample.indirect": blkif.IndirectRequest(blkif.BLKIF_OP_READ, 5, 3, 4, 1025, (100, 101, 102)),
}


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
@pytest.mark.parametrize("tag", sorted(_SAMPLES))
def test_c_built_requests_decode_and_encode_identically(
    probes: dict[str, dict[str, str]], abi: Abi, tag: str
) -> None:
    c_bytes = bytes.fromhex(probes[abi.name][tag])
    assert len(c_bytes) == abi.request_size
    assert blkif.decode_request(c_bytes, abi) == _SAMPLES[tag]
    assert blkif.encode_request(_SAMPLES[tag], abi) == c_bytes


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
def test_c_built_response_decodes_and_encodes_identically(
    probes: dict[str, dict[str, str]], abi: Abi
) -> None:
    c_bytes = bytes.fromhex(probes[abi.name]["sample.response"])
    expected = blkif.Response(2**64 - 2, blkif.BLKIF_OP_FLUSH_DISKCACHE, blkif.BLKIF_RSP_EOPNOTSUPP)
    assert blkif.decode_response(c_bytes, abi) == expected
    assert blkif.encode_response(expected, abi) == c_bytes


@pytest.mark.parametrize("abi,flags", [(X86_64, []), (X86_32, ["-m32"])], ids=["x86_64-abi", "x86_32-abi"])
def test_codec_description_compiles_as_static_asserts(tmp_path, abi: Abi, flags: list[str]) -> None:
    """The core's one description (blkif.layouts_for), turned into C11 _Static_assert lines
    as a compiled ring loop would include them, holds against the installed header."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: the header layout check needs gcc (apt-get install gcc gcc-multilib)")
    lines = ["#include <stddef.h>", "#include <stdint.h>", "#include <xen/io/blkif.h>"]
    for layout in blkif.layouts_for(abi).values():
        lines += layout.c_asserts()
    source = tmp_path / "asserts.c"
    source.write_text("\n".join(lines) + "\n")
    build = subprocess.run(
        [gcc, "-std=gnu11", "-Wall", "-Werror", "-fsyntax-only", *flags, str(source)],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, f"{abi.name}: the description disagrees with blkif.h:\n{build.stderr}"
    # And a wrong number is caught (the check is not vacuous).
    source.write_text("\n".join(lines + ['_Static_assert(sizeof(struct blkif_response) == 1, "x");']) + "\n")
    broken = subprocess.run(
        [gcc, "-std=gnu11", "-fsyntax-only", *flags, str(source)], capture_output=True, text=True, check=False
    )
    assert broken.returncode != 0
