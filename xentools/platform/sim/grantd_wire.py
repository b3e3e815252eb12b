"""grantd's wire format: messages between the software Xen's handles and grantd.

Owns: the private protocol spoken between grantd (grantd.py, grantd_grants.py,
grantd_events.py) and its clients (grants.py, evtchn.py): message framing, operations,
connection kinds, error codes and how an ERROR reply becomes the same exception again, the
limits that keep every message small, the Xen table sizes both sides check, the
request/reply client connection (ServiceConnection) and query_state().
Must not: hold any table or any service logic, or block anywhere but in a request.

A SOCK_SEQPACKET unix socket, so every message keeps its boundary and the file descriptors
sent with it (SCM_RIGHTS) arrive with that message. A message is a 12-byte header (op u16,
reserved u16, count of integers u32, length of the blob u32), `count` little-endian int64
and a blob; the header's lengths must match the datagram. Each connection first says HELLO
with its kind (gntshr, gnttab, evtchn, control) and the domid it acts as. A gntshr
connection sends its memfd with HELLO; an evtchn connection sends the write end of its
doorbell pipe, which its peers ring directly (event notifications never travel through
grantd: see evtchn_channel.py). Replies that could outgrow a message (STATE) travel in a
memfd.
"""

from __future__ import annotations

import array
import enum
import json
import os
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xentools.platform.interface import (
    PAGE_SIZE,
    EventChannelError,
    GrantError,
    GrantStillMapped,
    PlatformError,
)

HEADER = struct.Struct("<HHII")
# A SOCK_SEQPACKET message must fit in the sender's socket buffer (about 208 KiB by default),
# so every request and reply is kept well below that by the limits that follow.
MAX_MESSAGE = 128 * 1024
MAX_FDS = 8
MAX_SHARE_PAGES = 4096
MAX_MAP_REFS = 4096
MAX_COPY_SEGMENTS = 1024
MAX_COPY_BYTES = 64 * 1024

# Xen: refs below GNTTAB_NR_RESERVED_ENTRIES belong to the toolstack (xenstore, console).
GNTTAB_NR_RESERVED_ENTRIES = 8
NR_GRANT_ENTRIES = 64 * (PAGE_SIZE // 8)  # 64 frames of 8-byte grant_entry_v1
NR_EVENT_CHANNELS = 4096  # EVTCHN_2L_NR_CHANNELS on 64-bit guests
DOMID_FIRST_RESERVED = 0x7FF0
GRANT_REF_MAX = 0xFFFFFFFF


class Op(enum.IntEnum):
    """Message operations; every request gets OK or ERROR back."""

    HELLO = 1  # [kind, domid] (+ memfd for gntshr, doorbell pipe's write end for evtchn)
    BYE = 2  # [] release everything this connection holds, then OK
    SHARE = 10  # [target domid, writable, page...] -> [ref...]
    UNSHARE = 11  # [ref...] -> [] or ERROR(STILL_MAPPED, ref...)
    IS_MAPPED = 12  # [ref...] -> [0|1]
    MAP = 20  # [granter domid, writable, ref...] -> [map id, nfiles, (file index, page)...] + fds
    UNMAP = 21  # [map id] -> []
    COPY = 22  # [n, (to_grant, domid, ref, offset, length)...] + blob -> blob
    BIND_UNBOUND = 30  # [remote domid] -> LINK of the new port
    BIND_INTERDOMAIN = 31  # [remote domid, remote port] -> LINK of the new port
    UNBIND = 34  # [port] -> []
    LINK = 35  # [port] -> [port, end, peer's end or -1, remote port or -1] + channel page
    #            (+ a write end of the peer's doorbell when bound): where its events travel
    STATE = 40  # [] -> [length] + memfd holding the tables as JSON (tests and debugging)
    OK = 100
    ERROR = 101  # [code, detail ints...] + blob: the one-line message

class Kind(enum.IntEnum):
    """What a connection is: one handle of libxengntshr, libxengnttab or libxenevtchn."""

    GNTSHR = 1
    GNTTAB = 2
    EVTCHN = 3
    CONTROL = 4


class ErrorCode(enum.IntEnum):
    PLATFORM = 1
    GRANT = 2
    GRANT_STILL_MAPPED = 3
    EVTCHN = 4


_ERROR_CLASSES: dict[ErrorCode, type[PlatformError]] = {
    ErrorCode.PLATFORM: PlatformError,
    ErrorCode.GRANT: GrantError,
    ErrorCode.GRANT_STILL_MAPPED: GrantStillMapped,
    ErrorCode.EVTCHN: EventChannelError,
}


class WireError(PlatformError):
    """A grantd message is malformed (length, arity or value out of range)."""


@dataclass(frozen=True)
class Message:
    """One grantd message: an operation, some integers and an optional blob."""

    op: int
    ints: tuple[int, ...] = ()
    blob: bytes = b""

    def encode(self) -> bytes:
        n = len(self.ints)
        try:
            data = HEADER.pack(self.op, 0, n, len(self.blob)) + struct.pack(f"<{n}q", *self.ints)
        except struct.error as err:
            raise WireError(f"grantd.bad_value: {Op(self.op).name} cannot carry it: {err}") from None
        if self.blob:
            data += self.blob
        if len(data) > MAX_MESSAGE:
            raise WireError(f"grantd.message_too_long: {len(data)} bytes > {MAX_MESSAGE}")
        return data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Message:
        if len(data) < HEADER.size:
            raise WireError(f"grantd.short_message: {len(data)} bytes < header {HEADER.size}")
        op, _reserved, n, blob_len = HEADER.unpack_from(data)
        if HEADER.size + 8 * n + blob_len != len(data):
            raise WireError(
                f"grantd.bad_length: header says {n} ints and {blob_len} bytes, "
                f"message has {len(data)} bytes"
            )
        ints = struct.unpack_from(f"<{n}q", data, HEADER.size)
        blob = bytes(data[HEADER.size + 8 * n :])
        return cls(op, ints, blob)


def error_message(err: PlatformError) -> Message:
    """The ERROR reply carrying `err` to the client, which raises the same class again."""
    code = ErrorCode.PLATFORM
    for c, cls in _ERROR_CLASSES.items():
        if type(err) is cls:
            code = c
    detail = tuple(getattr(err, "refs", ()))
    return Message(Op.ERROR, (code, *detail), str(err).encode())


def raise_error(msg: Message) -> None:
    """Raise the exception an ERROR reply carries."""
    code = msg.ints[0] if msg.ints else ErrorCode.PLATFORM
    try:
        cls = _ERROR_CLASSES[ErrorCode(code)]
    except ValueError:
        cls = PlatformError
    err = cls(msg.blob.decode(errors="replace"))
    if cls is GrantStillMapped:
        err.refs = tuple(msg.ints[1:])  # type: ignore[attr-defined]
    raise err


# A service handler's answer: the reply, the descriptors it carries (still the sender's) and
# optionally those of them to close once it is sent.
Reply = tuple[Message, list[int]] | tuple[Message, list[int], list[int]]


def fds_from_ancdata(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors an SCM_RIGHTS control message carried (the caller owns them)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def close_fds(fds: Iterable[int]) -> None:
    """Close each descriptor, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


ANCBUFSIZE = socket.CMSG_SPACE(MAX_FDS * 4)


def domid_ok(domid: int) -> bool:
    """True for a domain id a guest may name (below DOMID_FIRST_RESERVED)."""
    return 0 <= domid < DOMID_FIRST_RESERVED


def need_ints(msg: Message, n: int, at_least: bool = False) -> None:
    """Raise WireError unless `msg` carries `n` integers (or at least `n`)."""
    if len(msg.ints) < n if at_least else len(msg.ints) != n:
        raise WireError(
            f"grantd.arity: {Op(msg.op).name} needs {'at least ' if at_least else ''}{n} "
            f"integers, got {len(msg.ints)}"
        )

# ---------------------------------------------------------------------------------------------
# Client side of the wire (used by grants.py and evtchn.py)
# ---------------------------------------------------------------------------------------------


class ServiceConnection:
    """A blocking request/reply connection to grantd acting as domain `domid`.

    Thread-safe: one request at a time. Transport failures raise PlatformError naming
    "grantd.connection"; ERROR replies raise GrantError, GrantStillMapped, EventChannelError
    or PlatformError as the service chose.
    """

    def __init__(
        self,
        path: str,
        kind: Kind,
        domid: int,
        *,
        fds: Sequence[int] = (),
        timeout: float = 30.0,
    ) -> None:
        self.path = path
        self.domid = domid
        self._lock = threading.Lock()
        self._buf = bytearray(MAX_MESSAGE + 1)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as err:
            sock.close()
            raise PlatformError(
                f"grantd.connection: cannot connect to {path}: {err.strerror or err}"
            ) from None
        self._sock: socket.socket | None = sock
        try:
            self.request(Op.HELLO, (int(kind), domid), fds=fds)
        except BaseException:
            self._close_socket()
            raise

    def _closed_error(self) -> PlatformError:
        return PlatformError(f"grantd.connection: connection to {self.path} is closed")

    def request(
        self,
        op: Op,
        ints: Sequence[int] = (),
        blob: bytes = b"",
        fds: Sequence[int] = (),
    ) -> tuple[Message, list[int]]:
        """Send a request and return the OK reply and the file descriptors it carried."""
        data = Message(op, tuple(ints), blob).encode()
        with self._lock:
            sock = self._sock
            if sock is None:
                raise self._closed_error()
            try:
                if fds:
                    sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                else:
                    sock.send(data)
                n, ancdata, flags, _ = sock.recvmsg_into([self._buf], ANCBUFSIZE)
            except OSError as err:
                raise PlatformError(
                    f"grantd.connection: {Op(op).name} to {self.path} failed: {err}"
                ) from None
            got_fds = fds_from_ancdata(ancdata)
            if n == 0:
                close_fds(got_fds)
                raise PlatformError(f"grantd.connection: {self.path} closed the connection")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                close_fds(got_fds)
                raise PlatformError("grantd.connection: reply truncated")
            try:
                reply = Message.decode(memoryview(self._buf)[:n])
            except WireError:
                close_fds(got_fds)
                raise
        if reply.op == Op.ERROR:
            close_fds(got_fds)
            raise_error(reply)
        if reply.op != Op.OK:
            close_fds(got_fds)
            raise WireError(f"grantd.unexpected_reply: op {reply.op} to {Op(op).name}")
        return reply, got_fds

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Say BYE (so the service has released everything when this returns) and close."""
        if self._sock is None:
            return
        try:
            self.request(Op.BYE)
        except PlatformError:
            pass  # the service is gone: it held nothing of ours any more
        finally:
            with self._lock:
                self._close_socket()

    @property
    def closed(self) -> bool:
        return self._sock is None


def query_state(socket_path: str, timeout: float = 10.0) -> dict:
    """The service's tables as plain data: grants, maps, ports and clients (tests, debugging).
    The reply travels in a memfd, so any number of grants and ports fits."""
    conn = ServiceConnection(socket_path, Kind.CONTROL, 0, timeout=timeout)
    try:
        reply, fds = conn.request(Op.STATE)
    finally:
        conn.close()
    try:
        if len(reply.ints) != 1 or len(fds) != 1:
            raise WireError("grantd.bad_reply: STATE reply carries no memfd")
        return json.loads(read_memfd(fds[0], reply.ints[0]))
    finally:
        close_fds(fds)


def write_memfd(name: str, data: bytes) -> int:
    """A new memfd holding `data` (for a reply that may not fit in one message)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_memfd(fd: int, length: int) -> bytes:
    """`length` bytes from the start of a memfd a reply carried."""
    chunks = []
    offset = 0
    while offset < length:
        chunk = os.pread(fd, length - offset, offset)
        if not chunk:
            raise WireError(f"grantd.bad_reply: memfd holds {offset} bytes, reply says {length}")
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
