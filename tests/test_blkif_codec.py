"""One blkif codec: every struct described once per ABI in xentools.core.blkif, used by all.

Checks that (1) no module of the package outside core/blkif.py holds a struct format of a
blkif struct, and the device modules do not even import `struct` (they take every layout
from the core's SlotCodec); (2) the description (layouts_for) covers every size and offset
of Abi, and the SlotCodec's precompiled structs are generated from it; (3) the hot-path
builders give the reference encoders' bytes. tests/test_header_layout.py compiles the
description's C assertions against the installed <xen/io/blkif.h>.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import struct
from pathlib import Path

import pytest

from xentools.core import blkif
from xentools.core.blkif import ABIS, X86_32, X86_64, Abi, codec_for, layouts_for

PACKAGE = Path(__file__).resolve().parent.parent / "xentools"
CODEC_MODULE = PACKAGE / "core" / "blkif.py"
BOTH = pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
_STRUCT_CALLS = {"Struct", "pack", "pack_into", "unpack", "unpack_from", "iter_unpack", "calcsize"}


def _norm(fmt: str) -> str:
    """A format without byte order, counts spelt out, trailing padding dropped: "<BBH4xQQ8x"
    and "BBHxxxxQQ" are the same layout."""
    body = fmt.lstrip("<=!@>").replace(" ", "")
    return re.sub(r"(\d+)(\D)", lambda m: m[2] * int(m[1]), body).rstrip("x")


def _blkif_formats() -> set[str]:
    """Every format the core compiles for a blkif struct (normalised)."""
    formats = set()
    for abi in ABIS.values():
        codec = codec_for(abi)
        for packer in (codec.request_header, codec.segment, codec.discard, codec.indirect,
                       codec.response, codec.request_id):
            formats.add(packer.format)
        for layout in layouts_for(abi).values():
            formats.add(layout.compile().format)
    return {_norm(fmt) for fmt in formats}


def _literal_format_calls(path: Path) -> list[tuple[int, str]]:
    """(line, format) of each call struct.X(<string literal>, ...) or X(<literal>) after a
    `from struct import X`."""
    tree = ast.parse(path.read_text(), str(path))
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "struct"
        for alias in node.names
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = (
            func.attr if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and func.value.id == "struct" else func.id if isinstance(func, ast.Name) and func.id in imported
            else None
        )
        if name not in _STRUCT_CALLS:
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.append((node.lineno, first.value))
        elif isinstance(first, ast.JoinedStr):  # f"<{n}I": the literal parts
            text = "".join(v.value for v in first.values if isinstance(v, ast.Constant))
            found.append((node.lineno, text))
    return found


def _is_blkif_format(fmt: str, known: set[str]) -> bool:
    """A blkif struct's layout, or a segment's signature (u32 gref, two u8) anywhere."""
    bare = _norm(fmt)
    return bare in known or "IBB" in bare


def test_no_blkif_struct_format_outside_the_core_codec() -> None:
    known = _blkif_formats()
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: struct format {fmt!r}"
        for path in sorted(PACKAGE.rglob("*.py")) if path != CODEC_MODULE
        for line, fmt in _literal_format_calls(path) if _is_blkif_format(fmt, known)
    ]
    assert offenders == [], "blkif layouts belong to xentools.core.blkif:\n" + "\n".join(offenders)


def test_the_check_finds_a_hand_written_segment_codec(tmp_path: Path) -> None:
    """The scan is not vacuous: the three codecs this replaced would each be caught."""
    sample = tmp_path / "old.py"
    sample.write_text(
        'import struct\n_SEG = struct.Struct("<IBBxx")\n'
        'def f(n, raw):\n    return struct.unpack(f"<{2 * n}I", raw)\n'
        'HDR = struct.Struct("<BBHxxxxQQ")\n'
    )
    known = _blkif_formats()
    hits = [fmt for _, fmt in _literal_format_calls(sample) if _is_blkif_format(fmt, known)]
    assert "<IBBxx" in hits and "<BBHxxxxQQ" in hits


@pytest.mark.parametrize(
    "module", sorted(p for p in (PACKAGE / "devices").glob("blk*.py")), ids=lambda p: p.name
)
def test_device_modules_take_layouts_from_the_core(module: Path) -> None:
    tree = ast.parse(module.read_text(), str(module))
    imports = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "struct" not in imports, f"{module.name} imports struct: use xentools.core.blkif.SlotCodec"


@BOTH
def test_description_covers_every_abi_size_and_offset(abi: Abi) -> None:
    layouts = layouts_for(abi)
    described = {(layout.c_name, layout.size) for layout in layouts.values()}
    offsets = {(layout.c_name, f.name): f.offset for layout in layouts.values() for f in layout.fields}
    prefixes = {
        "req": "struct blkif_request", "seg": "struct blkif_request_segment",
        "discard": "struct blkif_request_discard", "indirect": "struct blkif_request_indirect",
        "rsp": "struct blkif_response",
    }
    sizes = {
        "request_size": "struct blkif_request", "response_size": "struct blkif_response",
        "discard_size": "struct blkif_request_discard", "indirect_size": "struct blkif_request_indirect",
        "segment_size": "struct blkif_request_segment",
    }
    for field in dataclasses.fields(Abi):
        value = getattr(abi, field.name)
        if field.name in ("name", "entry_size"):
            continue
        if field.name in sizes:
            assert (sizes[field.name], value) in described, field.name
            continue
        prefix, member = field.name.split("_", 1)
        if field.name == "indirect_grefs":
            member = "indirect_grefs"
        assert offsets[(prefixes[prefix], member)] == value, field.name
    assert abi.entry_size == max(abi.request_size, abi.response_size)


@BOTH
def test_codec_structs_are_generated_from_the_description(abi: Abi) -> None:
    codec = codec_for(abi)
    assert codec is codec_for(abi)  # one instance per ABI
    layouts = codec.layouts
    assert codec.response.size == abi.response_size
    assert codec.discard.size == codec.indirect.size == abi.request_size
    assert codec.request_header.size == abi.req_seg
    assert codec.segment.format == "<IBB2x" and codec.segment.size == abi.segment_size
    assert codec.response.format == layouts["blkif_response"].compile(size=abi.response_size).format
    # Each member sits at the described offset: pack a marker into it, find it there.
    for key, packer in (("blkif_request_discard", codec.discard), ("blkif_request_indirect", codec.indirect)):
        layout = layouts[key]
        scalars = [f for f in layout.fields if f.code is not None]
        values = []
        for i, f in enumerate(scalars):
            values += [(i + 1) & 0xFF] * f.count
        raw = packer.pack(*values)
        for i, f in enumerate(scalars):
            assert raw[f.offset] == i + 1, (key, f.name)


def test_layout_compile_rejects_nested_struct_members() -> None:
    with pytest.raises(ValueError, match="not a scalar"):
        layouts_for(X86_64)["blkif_request"].compile(["seg"])


@BOTH
def test_c_asserts_name_every_member(abi: Abi) -> None:
    for layout in layouts_for(abi).values():
        text = "\n".join(layout.c_asserts())
        assert f"sizeof({layout.c_name}) == {layout.size}" in text
        for f in layout.fields:
            assert f"offsetof({layout.c_name}, {f.name}) == {f.offset}" in text


@BOTH
def test_header_of_any_slot_echoes_the_inner_op(abi: Abi) -> None:
    codec = codec_for(abi)
    ind = codec.indirect_request(blkif.BLKIF_OP_WRITE, 1, 0x55, 2, 3, [9])
    assert codec.header(ind + bytes(abi.entry_size - len(ind))) == (blkif.BLKIF_OP_INDIRECT, 0x55, blkif.BLKIF_OP_WRITE)
    bad = bytearray(ind)
    bad[abi.indirect_indirect_op] = blkif.BLKIF_OP_DISCARD
    assert codec.header(bytes(bad)) == (blkif.BLKIF_OP_INDIRECT, 0x55, blkif.BLKIF_OP_INDIRECT)
    junk = bytearray(abi.request_size)
    junk[0] = 200
    struct.pack_into("<Q", junk, abi.req_id, 2**64 - 1)
    assert codec.header(bytes(junk)) == (200, 2**64 - 1, 200)
    segs = codec.pack_segments([(7, 0, 7), (2**32 - 1, 1, 2)])
    assert codec.segment_grefs(segs, 2) == (7, 2**32 - 1)
