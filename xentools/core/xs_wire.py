"""The xenstore wire protocol (xen/io/xs_wire.h, docs/misc/xenstore.txt): frames and payloads.

Owns: the op numbers, the xsd_errors table, the 16-byte xsd_sockmsg header, a frame decoder
that accepts any chunking, and builders/parsers for every payload shape the protocol uses
(NUL-separated strings, paths, write payloads, watch events, permissions, DIRECTORY_PART).
Must not: do I/O, keep connection state beyond the decoder's buffer, or know what a node is.

Both sides use this module: our client (platform/xenstore.py) and the software xenstored
(platform/sim/xenstored.py). Every malformed input raises XsWireError with a stable rule id:

  xs_wire.payload_too_long  len > XENSTORE_PAYLOAD_MAX (4096); xenstored kills such a client
  xs_wire.unknown_op        a type that is not a request/reply type of xsd_sockmsg_type
  xs_wire.bad_header        a header field that does not fit in a u32
  xs_wire.missing_nul       a string argument without its terminating NUL
  xs_wire.bad_string        a string that is not UTF-8, or holds a NUL where none may be
  xs_wire.arg_count         the wrong number of NUL-terminated strings for the request
  xs_wire.bad_path          a path breaking the rules of docs/misc/xenstore.txt
  xs_wire.bad_perm          a permission string that is not [nrwb]<domid>
  xs_wire.bad_number        a decimal field (domid, transaction id, offset) that is not one
  xs_wire.bad_error         an ERROR payload that is not "E<name>\\0"
"""

from __future__ import annotations

import enum
import errno
import re
import struct
from dataclasses import dataclass

from xentools.core.errors import XsWireError

__all__ = [
    "ABS_PATH_MAX",
    "HEADER",
    "HEADER_SIZE",
    "PAYLOAD_MAX",
    "REL_PATH_MAX",
    "SPECIAL_PATHS",
    "XSD_ERRORS",
    "XS_TYPE_COUNT",
    "FrameDecoder",
    "Message",
    "Perm",
    "XsOp",
    "build_directory_part_reply",
    "directory_part_request",
    "encode",
    "error_name",
    "error_payload",
    "expect_known",
    "format_perms",
    "join_strings",
    "parse_decimal",
    "parse_directory_part_reply",
    "parse_perm",
    "parse_perms",
    "parse_watch_event",
    "parse_write",
    "path_arg",
    "split_strings",
    "validate_path",
    "watch_event_payload",
    "write_payload",
]


class XsOp(enum.IntEnum):
    """enum xsd_sockmsg_type of xs_wire.h (Xen 4.17). XS_DEBUG is an alias of XS_CONTROL."""

    CONTROL = 0
    DEBUG = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed in Xen 4.9; the header keeps the gap:
    # XS_RESET_WATCHES = XS_SET_TARGET + 2.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    INVALID = 0xFFFF  # "Guaranteed to remain an invalid type"


XS_TYPE_COUNT = 23  # XS_TYPE_COUNT: number of valid types (including the gap at 20)

PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX: "Violating this is very bad"
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048  # XENSTORE_REL_PATH_MAX

HEADER = struct.Struct("<IIII")  # struct xsd_sockmsg: type, req_id, tx_id, len
HEADER_SIZE = HEADER.size  # 16

_U32_MAX = 0xFFFFFFFF

# xsd_errors[] in header order ("New errors should be added at the end of the array"),
# with Linux errno numbers (the numbers never travel: the name does).
XSD_ERRORS: dict[str, int] = {
    "EINVAL": errno.EINVAL,
    "EACCES": errno.EACCES,
    "EEXIST": errno.EEXIST,
    "EISDIR": errno.EISDIR,
    "ENOENT": errno.ENOENT,
    "ENOMEM": errno.ENOMEM,
    "ENOSPC": errno.ENOSPC,
    "EIO": errno.EIO,
    "ENOTEMPTY": errno.ENOTEMPTY,
    "ENOSYS": errno.ENOSYS,
    "EROFS": errno.EROFS,
    "EBUSY": errno.EBUSY,
    "EAGAIN": errno.EAGAIN,
    "EISCONN": errno.EISCONN,
    "E2BIG": errno.E2BIG,
    "EPERM": errno.EPERM,
}

# Watch paths starting with "@" name events xenstored invents (docs/misc/xenstore.txt).
SPECIAL_PATHS = ("@introduceDomain", "@releaseDomain")

# Ops a request or reply may carry. XS_INVALID is a member of the enum but never valid.
_KNOWN_OPS = frozenset(op for op in XsOp if op is not XsOp.INVALID)


@dataclass(frozen=True)
class Message:
    """One xs_wire frame: header fields and payload.

    `op` is an XsOp when the type is one of xs_wire.h's; a frame decoded with a type outside
    the table keeps the raw integer so that a server can still answer it (by req_id) with an
    error instead of dropping the connection. `known` tells the two apart.
    """

    op: XsOp | int
    req_id: int
    tx_id: int
    payload: bytes

    def __post_init__(self) -> None:
        for name in ("op", "req_id", "tx_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= _U32_MAX:
                raise XsWireError("xs_wire.bad_header", f"{name}={value!r} is not a u32")
        if not isinstance(self.payload, bytes):
            raise XsWireError("xs_wire.bad_header", "payload must be bytes")
        if len(self.payload) > PAYLOAD_MAX:
            raise XsWireError(
                "xs_wire.payload_too_long",
                f"payload of {len(self.payload)} bytes exceeds XENSTORE_PAYLOAD_MAX {PAYLOAD_MAX}",
            )
        if self.op in _KNOWN_OPS and not isinstance(self.op, XsOp):
            object.__setattr__(self, "op", XsOp(self.op))

    @property
    def known(self) -> bool:
        """True when `op` is a type of xsd_sockmsg_type (XS_INVALID and the gap excluded)."""
        return self.op in _KNOWN_OPS


def expect_known(msg: Message) -> Message:
    """Return `msg`, or raise XsWireError("xs_wire.unknown_op") if its type is not known."""
    if not msg.known:
        raise XsWireError("xs_wire.unknown_op", f"type {msg.op} is not in xsd_sockmsg_type")
    return msg


def encode(msg: Message) -> bytes:
    """Header plus payload, ready to write."""
    if len(msg.payload) > PAYLOAD_MAX:  # also checked at construction; kept for clarity
        raise XsWireError("xs_wire.payload_too_long", f"payload of {len(msg.payload)} bytes")
    return HEADER.pack(int(msg.op), msg.req_id, msg.tx_id, len(msg.payload)) + msg.payload


class FrameDecoder:
    """Reassembles frames from a byte stream cut anywhere (a byte at a time works).

    A header announcing more than XENSTORE_PAYLOAD_MAX bytes raises XsWireError
    ("xs_wire.payload_too_long") as soon as its 16 bytes are in: the stream cannot be
    resynchronised after that, so the peer must be disconnected (as xenstored does). The
    decoder is then `broken` and refuses further input. Unknown types are not an error here:
    see Message.known.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: tuple[int, int, int, int] | None = None
        self.broken = False

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf) + (HEADER_SIZE if self._header is not None else 0)

    def feed(self, data: bytes) -> list[Message]:
        """Add bytes; return every frame completed by them, in order."""
        if self.broken:
            raise XsWireError("xs_wire.payload_too_long", "decoder already failed on this stream")
        self._buf += data
        out: list[Message] = []
        while True:
            if self._header is None:
                if len(self._buf) < HEADER_SIZE:
                    return out
                header = HEADER.unpack_from(self._buf, 0)
                del self._buf[:HEADER_SIZE]
                if header[3] > PAYLOAD_MAX:
                    self.broken = True
                    raise XsWireError(
                        "xs_wire.payload_too_long",
                        f"header announces {header[3]} bytes, more than {PAYLOAD_MAX}",
                    )
                self._header = header
            op, req_id, tx_id, length = self._header
            if len(self._buf) < length:
                return out
            payload = bytes(self._buf[:length])
            del self._buf[:length]
            self._header = None
            out.append(Message(op, req_id, tx_id, payload))


# ---------------------------------------------------------------------------------------------
# Strings


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XsWireError("xs_wire.bad_string", f"{raw[:40]!r} is not UTF-8") from None


def _encode_str(text: str, what: str) -> bytes:
    if "\0" in text:
        raise XsWireError("xs_wire.bad_string", f"{what} {text[:40]!r} contains a NUL")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise XsWireError("xs_wire.bad_string", f"{what} {text[:40]!r} is not encodable as UTF-8") from None


def split_strings(payload: bytes) -> list[str]:
    """NUL-terminated strings -> list ("a\\0b\\0" -> ["a", "b"]; b"" -> [])."""
    if not payload:
        return []
    if not payload.endswith(b"\0"):
        raise XsWireError("xs_wire.missing_nul", "payload does not end with NUL")
    return [_decode(part) for part in payload[:-1].split(b"\0")]


def join_strings(strings: list[str] | tuple[str, ...]) -> bytes:
    """Inverse of split_strings: each string followed by NUL."""
    return b"".join(_encode_str(s, "string") + b"\0" for s in strings)


def path_arg(payload: bytes) -> str:
    """The single argument of READ, MKDIR, RM, DIRECTORY...: exactly one NUL, at the end
    (xenstored's onearg()). The path itself is not validated here: see validate_path."""
    if not payload.endswith(b"\0"):
        raise XsWireError("xs_wire.missing_nul", "argument is not NUL-terminated")
    if payload.count(b"\0") != 1:
        raise XsWireError("xs_wire.arg_count", "expected exactly one NUL-terminated argument")
    return _decode(payload[:-1])


_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*")


def validate_path(path: str, *, relative_ok: bool = False, special_ok: bool = False) -> str:
    """Check `path` against docs/misc/xenstore.txt and return it unchanged.

    Allowed: ASCII alphanumerics and -/_@; no empty path, no "//", no trailing "/" except the
    root; absolute paths at most XENSTORE_ABS_PATH_MAX bytes, relative ones (allowed only with
    `relative_ok`) at most XENSTORE_REL_PATH_MAX. A leading "@" is a special watch/permission
    node (@introduceDomain, @releaseDomain) and allowed only with `special_ok`.
    """
    if not isinstance(path, str) or not path:
        raise XsWireError("xs_wire.bad_path", "empty path")
    if not _PATH_CHARS.fullmatch(path):
        bad = next(c for c in path if not _PATH_CHARS.fullmatch(c))
        raise XsWireError("xs_wire.bad_path", f"{path[:60]!r}: character {bad!r} not allowed")
    if path.startswith("@"):
        if not special_ok:
            raise XsWireError("xs_wire.bad_path", f"{path[:60]!r}: special path not allowed here")
        if len(path) > REL_PATH_MAX:  # xenstored's limit for special watch names
            raise XsWireError("xs_wire.bad_path", f"special path longer than {REL_PATH_MAX}")
        return path
    if "//" in path:
        raise XsWireError("xs_wire.bad_path", f"{path[:60]!r}: doubled slash")
    if path.endswith("/") and path != "/":
        raise XsWireError("xs_wire.bad_path", f"{path[:60]!r}: trailing slash")
    if path.startswith("/"):
        if len(path) > ABS_PATH_MAX:
            raise XsWireError(
                "xs_wire.bad_path", f"absolute path of {len(path)} bytes > {ABS_PATH_MAX}"
            )
    else:
        if not relative_ok:
            raise XsWireError("xs_wire.bad_path", f"{path[:60]!r}: relative path not allowed")
        if len(path) > REL_PATH_MAX:
            raise XsWireError(
                "xs_wire.bad_path", f"relative path of {len(path)} bytes > {REL_PATH_MAX}"
            )
    return path


def parse_decimal(text: str, what: str, maximum: int = _U32_MAX) -> int:
    """A plain unsigned decimal (domid, transaction id, offset, event channel)."""
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise XsWireError("xs_wire.bad_number", f"{what} {text[:24]!r} is not a decimal number")
    value = int(text)
    if value > maximum:
        raise XsWireError("xs_wire.bad_number", f"{what} {value} is larger than {maximum}")
    return value


# ---------------------------------------------------------------------------------------------
# WRITE: <path>|<value|>  (the value is binary and NOT NUL-terminated)


def write_payload(path: str, value: bytes) -> bytes:
    return _encode_str(path, "path") + b"\0" + bytes(value)


def parse_write(payload: bytes) -> tuple[str, bytes]:
    """(path, value) of a WRITE request; the value runs to the end of the payload."""
    nul = payload.find(b"\0")
    if nul < 0:
        raise XsWireError("xs_wire.missing_nul", "WRITE path is not NUL-terminated")
    return _decode(payload[:nul]), payload[nul + 1 :]


# ---------------------------------------------------------------------------------------------
# WATCH_EVENT: <epath>|<token>|


def watch_event_payload(path: str, token: str) -> bytes:
    return join_strings([path, token])


def parse_watch_event(payload: bytes) -> tuple[str, str]:
    """(path, token) of a WATCH_EVENT (XS_WATCH_PATH = 0, XS_WATCH_TOKEN = 1)."""
    strings = split_strings(payload)
    if len(strings) < 2:
        raise XsWireError("xs_wire.arg_count", f"watch event has {len(strings)} strings, not 2")
    return strings[0], strings[1]


# ---------------------------------------------------------------------------------------------
# ERROR: E<name>|


def error_payload(name: str) -> bytes:
    """Payload of an XS_ERROR reply, e.g. b"ENOENT\\0"."""
    if name not in XSD_ERRORS:
        raise XsWireError("xs_wire.bad_error", f"{name!r} is not in xsd_errors")
    return name.encode("ascii") + b"\0"


def error_name(payload: bytes) -> str:
    """The error name of an XS_ERROR payload, as sent (libxenstore maps unknown names to
    EINVAL; we keep the name so the caller sees what the server said)."""
    strings = split_strings(payload)
    if len(strings) != 1 or not re.fullmatch(r"E[A-Z0-9]+", strings[0]):
        raise XsWireError("xs_wire.bad_error", f"{payload[:40]!r} is not an error name")
    return strings[0]


# ---------------------------------------------------------------------------------------------
# Permissions: <perm-as-string> = [nrwb]<domid>; the first entry is the owner, and its
# letter is the access of every domain not listed.

_PERM_RE = re.compile(r"([nrwb])([0-9]{1,5})")


@dataclass(frozen=True)
class Perm:
    """One permission entry: `access` is n (none), r (read), w (write) or b (both)."""

    access: str
    domid: int

    def __post_init__(self) -> None:
        if self.access not in ("n", "r", "w", "b"):
            raise XsWireError("xs_wire.bad_perm", f"access {self.access!r} is not n, r, w or b")
        if not isinstance(self.domid, int) or not 0 <= self.domid <= 0xFFFF:
            raise XsWireError("xs_wire.bad_perm", f"domid {self.domid!r} out of range")

    @property
    def read(self) -> bool:
        return self.access in ("r", "b")

    @property
    def write(self) -> bool:
        return self.access in ("w", "b")

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"


def parse_perm(text: str) -> Perm:
    match = _PERM_RE.fullmatch(text)
    if not match or int(match.group(2)) > 0xFFFF:
        raise XsWireError("xs_wire.bad_perm", f"{text[:24]!r} is not [nrwb]<domid>")
    return Perm(match.group(1), int(match.group(2)))


def parse_perms(strings: list[str]) -> tuple[Perm, ...]:
    """At least one entry (the owner)."""
    if not strings:
        raise XsWireError("xs_wire.bad_perm", "no permission entries (the owner is required)")
    return tuple(parse_perm(s) for s in strings)


def format_perms(perms: list[Perm] | tuple[Perm, ...]) -> bytes:
    """GET_PERMS reply / SET_PERMS tail: each entry NUL-terminated."""
    return join_strings([str(p) for p in perms])


# ---------------------------------------------------------------------------------------------
# DIRECTORY_PART: request <path>|<offset>|, reply <gencnt>|<child>|*  and, on the last part,
# one more NUL (libxenstore stops when the collected list ends in two NULs).


def directory_part_request(path: str, offset: int) -> bytes:
    return join_strings([path, str(offset)])


def build_directory_part_reply(generation: int, children: bytes, offset: int) -> bytes:
    """One part of the NUL-terminated child list `children`, starting at byte `offset`.

    Follows xenstored's send_directory_part(): whole names only, as many as fit in
    XENSTORE_PAYLOAD_MAX after the generation string and one spare byte; the part holding
    the end of the list gets an extra NUL; an offset at or past the end yields just that NUL.
    """
    gen = str(generation).encode("ascii") + b"\0"
    if offset >= len(children):
        return gen + b"\0"
    maxlen = PAYLOAD_MAX - len(gen) - 1
    end = offset
    while end < len(children):
        nul = children.index(b"\0", end)
        if nul + 1 - offset > maxlen:
            break
        end = nul + 1
    if end == offset:  # a single name longer than a part: cannot happen with valid names
        raise XsWireError("xs_wire.payload_too_long", "child name does not fit in one part")
    part = children[offset:end]
    if end == len(children):
        part += b"\0"
    return gen + part


def parse_directory_part_reply(payload: bytes) -> tuple[str, bytes, bool]:
    """(generation, chunk of NUL-terminated names, is_last) of a DIRECTORY_PART reply.

    The chunk keeps its bytes so the caller can concatenate parts before splitting; the
    trailing end-of-list NUL is removed from the chunk when is_last.
    """
    nul = payload.find(b"\0")
    if nul < 0:
        raise XsWireError("xs_wire.missing_nul", "DIRECTORY_PART generation not NUL-terminated")
    gen = _decode(payload[:nul])
    parse_decimal(gen, "generation", maximum=2**64 - 1)
    chunk = payload[nul + 1 :]
    if not chunk:
        raise XsWireError("xs_wire.missing_nul", "DIRECTORY_PART reply has no list")
    if not chunk.endswith(b"\0"):
        raise XsWireError("xs_wire.missing_nul", "DIRECTORY_PART names not NUL-terminated")
    if chunk == b"\0":
        return gen, b"", True
    if chunk.endswith(b"\0\0"):
        return gen, chunk[:-1], True
    return gen, chunk, False
