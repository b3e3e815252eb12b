"""xs_wire framing and payloads, checked against the installed xen/io/xs_wire.h."""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.core.errors import XsWireError
from xentools.core.xs_wire import (
    ABS_PATH_MAX,
    HEADER_SIZE,
    PAYLOAD_MAX,
    REL_PATH_MAX,
    XS_TYPE_COUNT,
    XSD_ERRORS,
    FrameDecoder,
    Message,
    Perm,
    XsOp,
    build_directory_part_reply,
    directory_part_request,
    encode,
    error_name,
    error_payload,
    expect_known,
    format_perms,
    join_strings,
    parse_decimal,
    parse_directory_part_reply,
    parse_perm,
    parse_perms,
    parse_watch_event,
    parse_write,
    path_arg,
    split_strings,
    validate_path,
    watch_event_payload,
    write_payload,
)

HEADER_FILE = "/usr/include/xen/io/xs_wire.h"


def _header_ops() -> dict[str, int]:
    """Evaluate enum xsd_sockmsg_type from the header text (C enum rules)."""
    text = Path(HEADER_FILE).read_text()
    body = re.search(r"enum xsd_sockmsg_type\s*\{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    body = "\n".join(line for line in body.splitlines() if not line.strip().startswith("#"))
    values: dict[str, int] = {}
    nxt = 0
    for item in (i.strip() for i in body.split(",")):
        if not item:
            continue
        if "=" in item:
            name, expr = (x.strip() for x in item.split("="))
            for known, val in values.items():
                expr = re.sub(rf"\b{known}\b", str(val), expr)
            nxt = eval(expr, {"__builtins__": {}})  # noqa: S307 - integer arithmetic only
        else:
            name = item
        values[name] = nxt
        nxt += 1
    return values


def test_every_op_of_the_header_with_its_number():
    ops = _header_ops()
    assert ops["XS_RESET_WATCHES"] == ops["XS_SET_TARGET"] + 2
    for name, value in ops.items():
        short = name.removeprefix("XS_")
        if short == "TYPE_COUNT":
            assert value == XS_TYPE_COUNT
            continue
        assert XsOp[short] == value, name
    assert XsOp.DEBUG is XsOp.CONTROL
    assert {op.name for op in XsOp} == {n.removeprefix("XS_") for n in ops} - {"TYPE_COUNT"}


def test_error_table_matches_header_order_and_errno():
    text = Path(HEADER_FILE).read_text()
    names = re.findall(r"XSD_ERROR\((E[A-Z0-9]+)\)", text)
    assert list(XSD_ERRORS) == names
    for name, number in XSD_ERRORS.items():
        assert number == getattr(errno, name)


def test_limits_match_header():
    text = Path(HEADER_FILE).read_text()
    for name, value in (
        ("XENSTORE_PAYLOAD_MAX", PAYLOAD_MAX),
        ("XENSTORE_ABS_PATH_MAX", ABS_PATH_MAX),
        ("XENSTORE_REL_PATH_MAX", REL_PATH_MAX),
    ):
        assert int(re.search(rf"#define {name} (\d+)", text).group(1)) == value
    assert HEADER_SIZE == 16


def test_encode_layout():
    msg = Message(XsOp.READ, 7, 3, b"/a\0")
    assert encode(msg) == struct.pack("<IIII", 2, 7, 3, 3) + b"/a\0"


def test_encode_oversize_payload():
    with pytest.raises(XsWireError) as exc:
        encode(Message(XsOp.WRITE, 1, 0, b"x" * (PAYLOAD_MAX + 1)))
    assert exc.value.rule == "xs_wire.payload_too_long"
    assert str(exc.value).startswith("xs_wire.payload_too_long: ")
    assert len(encode(Message(XsOp.WRITE, 1, 0, b"x" * PAYLOAD_MAX))) == HEADER_SIZE + PAYLOAD_MAX


def test_message_rejects_fields_beyond_u32():
    with pytest.raises(XsWireError) as exc:
        Message(XsOp.READ, 2**32, 0, b"")
    assert exc.value.rule == "xs_wire.bad_header"
    with pytest.raises(XsWireError):
        Message(XsOp.READ, 0, -1, b"")
    with pytest.raises(XsWireError):
        Message(XsOp.READ, 0, 0, "text")  # type: ignore[arg-type]


def _frames() -> tuple[list[Message], bytes]:
    msgs = [
        Message(XsOp.WRITE, 1, 0, write_payload("/a/b", b"value")),
        Message(XsOp.WATCH_EVENT, 0, 0, watch_event_payload("/a", "tok")),
        Message(XsOp.TRANSACTION_START, 2, 0, b"\0"),
        Message(XsOp.READ, 3, 9, b""),
    ]
    return msgs, b"".join(encode(m) for m in msgs)


def test_decode_whole():
    msgs, data = _frames()
    dec = FrameDecoder()
    assert dec.feed(data) == msgs
    assert dec.pending == 0


def test_decode_byte_by_byte():
    msgs, data = _frames()
    dec = FrameDecoder()
    out: list[Message] = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert out == msgs
    assert all(isinstance(m.op, XsOp) for m in out)


def test_decode_keeps_trailing_partial_frame():
    msgs, data = _frames()
    extra = encode(Message(XsOp.MKDIR, 4, 0, b"/x\0"))
    dec = FrameDecoder()
    assert dec.feed(data + extra[:10]) == msgs
    assert dec.pending == 10
    assert dec.feed(extra[10:]) == [Message(XsOp.MKDIR, 4, 0, b"/x\0")]


def test_decode_oversize_header_fails_at_once():
    dec = FrameDecoder()
    assert dec.feed(struct.pack("<III", 2, 1, 0)) == []
    with pytest.raises(XsWireError) as exc:
        dec.feed(struct.pack("<I", PAYLOAD_MAX + 1))  # no payload byte needed to decide
    assert exc.value.rule == "xs_wire.payload_too_long"
    assert dec.broken
    with pytest.raises(XsWireError):
        dec.feed(b"\0")


def test_unknown_op_is_kept_with_its_req_id():
    dec = FrameDecoder()
    raw = struct.pack("<IIII", 20, 77, 5, 2) + b"x\0" + struct.pack("<IIII", 999, 78, 0, 0)
    first, second = dec.feed(raw)
    assert (first.op, first.req_id, first.tx_id, first.known) == (20, 77, 5, False)
    assert not second.known and second.req_id == 78
    assert not Message(XsOp.INVALID, 1, 0, b"").known
    with pytest.raises(XsWireError) as exc:
        expect_known(first)
    assert exc.value.rule == "xs_wire.unknown_op"
    assert expect_known(Message(2, 1, 0, b"")).op is XsOp.READ


def test_split_and_join_strings():
    assert split_strings(b"") == []
    assert split_strings(b"a\0bc\0\0") == ["a", "bc", ""]
    assert join_strings(["a", "bc"]) == b"a\0bc\0"
    with pytest.raises(XsWireError) as exc:
        split_strings(b"a\0b")
    assert exc.value.rule == "xs_wire.missing_nul"
    with pytest.raises(XsWireError) as exc:
        split_strings(b"\xff\0")
    assert exc.value.rule == "xs_wire.bad_string"
    for bad in ("a\0b", "\ud800"):  # a NUL inside, a lone surrogate
        with pytest.raises(XsWireError) as exc:
            join_strings([bad])
        assert exc.value.rule == "xs_wire.bad_string"


def test_path_arg_requires_exactly_one_terminating_nul():
    assert path_arg(b"/a/b\0") == "/a/b"
    with pytest.raises(XsWireError) as exc:
        path_arg(b"/a/b")
    assert exc.value.rule == "xs_wire.missing_nul"
    with pytest.raises(XsWireError) as exc:
        path_arg(b"/a\0b\0")
    assert exc.value.rule == "xs_wire.arg_count"


@pytest.mark.parametrize(
    "path",
    ["/", "/a", "/local/domain/3/device/vbd/51712", "a/b", "@x/y", "/a-b_c@d", "/" + "a" * (ABS_PATH_MAX - 1)],
)
def test_valid_paths(path):
    assert validate_path(path, relative_ok=True, special_ok=True) == path


@pytest.mark.parametrize(
    "path",
    ["", "/a//b", "/a/", "//", "/a b", "/a.b", "/é", "/a\0", "/" + "a" * ABS_PATH_MAX, "a" * (REL_PATH_MAX + 1)],
)
def test_bad_paths(path):
    with pytest.raises(XsWireError) as exc:
        validate_path(path, relative_ok=True, special_ok=True)
    assert exc.value.rule == "xs_wire.bad_path"


def test_relative_and_special_paths_need_permission():
    with pytest.raises(XsWireError, match="relative"):
        validate_path("a/b")
    with pytest.raises(XsWireError, match="special"):
        validate_path("@releaseDomain")
    assert validate_path("@releaseDomain", special_ok=True) == "@releaseDomain"


def test_write_payload_value_not_terminated():
    payload = write_payload("/a", b"x\0y")
    assert payload == b"/a\0x\0y"
    assert parse_write(payload) == ("/a", b"x\0y")
    assert parse_write(b"/a\0") == ("/a", b"")
    with pytest.raises(XsWireError) as exc:
        parse_write(b"/a")
    assert exc.value.rule == "xs_wire.missing_nul"


def test_watch_event_round_trip():
    assert watch_event_payload("/a/b", "t1") == b"/a/b\0t1\0"
    assert parse_watch_event(b"/a/b\0t1\0") == ("/a/b", "t1")
    with pytest.raises(XsWireError) as exc:
        parse_watch_event(b"/a/b\0")
    assert exc.value.rule == "xs_wire.arg_count"


def test_error_payloads():
    assert error_payload("ENOENT") == b"ENOENT\0"
    assert error_name(b"EAGAIN\0") == "EAGAIN"
    assert error_name(b"EFUTURE\0") == "EFUTURE"  # a newer server's error is passed on
    with pytest.raises(XsWireError) as exc:
        error_payload("ENOTANERROR")
    assert exc.value.rule == "xs_wire.bad_error"
    with pytest.raises(XsWireError):
        error_name(b"OK\0")


def test_perms():
    assert parse_perm("b3") == Perm("b", 3)
    assert str(Perm("r", 65535)) == "r65535"
    perms = parse_perms(["n0", "r1", "w2", "b3"])
    assert [p.read for p in perms] == [False, True, False, True]
    assert [p.write for p in perms] == [False, False, True, True]
    assert format_perms(perms) == b"n0\0r1\0w2\0b3\0"
    for bad in ("x1", "b", "r-1", "r65536", "R1", "b1 ", "b0x1"):
        with pytest.raises(XsWireError) as exc:
            parse_perm(bad)
        assert exc.value.rule == "xs_wire.bad_perm"
    with pytest.raises(XsWireError):
        parse_perms([])


def test_decimal():
    assert parse_decimal("42", "domid") == 42
    for bad in ("", "-1", "0x10", "1 ", "٣"):
        with pytest.raises(XsWireError) as exc:
            parse_decimal(bad, "domid")
        assert exc.value.rule == "xs_wire.bad_number"
    with pytest.raises(XsWireError):
        parse_decimal("65536", "domid", maximum=0xFFFF)


def test_directory_part_follows_xenstored():
    assert directory_part_request("/a", 12) == b"/a\x0012\0"
    # Offset past the end: generation and the single end-of-list NUL.
    assert build_directory_part_reply(5, b"", 0) == b"5\0\0"
    assert parse_directory_part_reply(b"5\0\0") == ("5", b"", True)
    names = [f"child-{i:04d}" for i in range(1000)]  # 11000 bytes of names: three parts
    children = join_strings(names)
    collected, offset, parts = b"", 0, 0
    while True:
        reply = build_directory_part_reply(99, children, offset)
        assert len(reply) <= PAYLOAD_MAX
        gen, chunk, last = parse_directory_part_reply(reply)
        assert gen == "99"
        collected += chunk
        offset += len(chunk)
        parts += 1
        if last:
            break
    assert parts == 3
    assert split_strings(collected) == names
    with pytest.raises(XsWireError):
        parse_directory_part_reply(b"5")


@settings(max_examples=60, deadline=None)
@given(
    op=st.sampled_from(sorted(set(XsOp))),
    req_id=st.integers(0, 2**32 - 1),
    tx_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=PAYLOAD_MAX),
    cuts=st.lists(st.integers(1, 64), max_size=20),
)
def test_round_trip_any_chunking(op, req_id, tx_id, payload, cuts):
    msg = Message(op, req_id, tx_id, payload)
    data = encode(msg) * 2
    dec = FrameDecoder()
    out: list[Message] = []
    pos = 0
    for cut in cuts:
        out += dec.feed(data[pos : pos + cut])
        pos += cut
    out += dec.feed(data[pos:])
    assert out == [msg, msg]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20),
        max_size=10,
    )
)
def test_strings_round_trip(strings):
    assert split_strings(join_strings(strings)) == strings
