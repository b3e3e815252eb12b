"""grantd: the software Xen's grant tables and event channels, one service for every domain.

Owns: the private wire format spoken with the client side (grants.py, evtchn.py), the grant
table of every simulated domain, the event channel port table of every simulated domain, and
`run_grantd()` (`python -m xentools.platform.sim.grantd --socket PATH`).
Must not: hold or touch granted memory except for grant copy (pages live in each granter's
own memfd and are mapped by the peers themselves), know anything about blkif, or let one
client's bad message hurt another client (a malformed message closes that client only).

Wire format (private to this package): a SOCK_SEQPACKET unix socket, so every message keeps
its boundary and the file descriptors sent with it (SCM_RIGHTS) arrive with that message. A
message is a 12-byte header (op u16, reserved u16, count of integers u32, length of the blob
u32), `count` little-endian int64 and a blob; the header's lengths must match the datagram.
Each connection first says HELLO with its kind (gntshr, gnttab, evtchn, control) and the domid
it acts as. A gntshr connection sends its memfd with HELLO; an evtchn connection sends one end
of a socketpair on which the service then pushes EVENT messages (one port each), so the
handle's fd is readable exactly when an event is waiting and replies never mix with events.

Semantics, following Xen:
- Grant refs are per granting domain, allocated from 8 up (refs 0..7 are
  GNTTAB_NR_RESERVED_ENTRIES) to 32767 (64 grant frames of 512 v1 entries, Xen's default).
- Only the grant's target domain may map or copy it; a read-only grant is never mapped
  writable and the mapper then receives a read-only file descriptor.
- A grant that is still mapped when its granter revokes it (unshare or disconnect) is not
  freed (XSA-396): it stops being mappable and is freed when its last map goes away.
- Event channel ports are per domain, from 1 (port 0 is never valid) to 4095 (the 2-level
  ABI limit). A notified port becomes pending; delivery masks it; a notify while masked sets
  pending and is delivered again on unmask. bind_interdomain conservatively raises an event on
  the new local port, as Xen's evtchn_bind_interdomain() does.
- Closing one end of an interdomain channel (unbind or the client going away) leaves the other
  end unbound, offered back to the closer's domain; a notify on an unbound port is silently
  dropped, as Xen's evtchn_send() does for ECS_UNBOUND.
"""

from __future__ import annotations

import argparse
import array
import enum
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from xentools.platform.interface import (
    PAGE_SIZE,
    EventChannelError,
    GrantError,
    GrantStillMapped,
    PlatformError,
)

log = logging.getLogger("xentools.grantd")

# ---------------------------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------------------------

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

# A client that stops reading its replies or events is cut off instead of growing our memory.
MAX_OUTBOX_BYTES = 4 * 1024 * 1024


class Op(enum.IntEnum):
    """Message operations. Requests get OK or ERROR back except NOTIFY and UNMASK (one-way,
    so that an event costs one message each way)."""

    HELLO = 1  # [kind, domid] (+ memfd for gntshr, event socket for evtchn)
    BYE = 2  # [] release everything this connection holds, then OK
    SHARE = 10  # [target domid, writable, page...] -> [ref...]
    UNSHARE = 11  # [ref...] -> [] or ERROR(STILL_MAPPED, ref...)
    IS_MAPPED = 12  # [ref...] -> [0|1]
    MAP = 20  # [granter domid, writable, ref...] -> [map id, nfiles, (file index, page)...] + fds
    UNMAP = 21  # [map id] -> []
    COPY = 22  # [n, (to_grant, domid, ref, offset, length)...] + blob -> blob
    BIND_UNBOUND = 30  # [remote domid] -> [port]
    BIND_INTERDOMAIN = 31  # [remote domid, remote port] -> [port]
    NOTIFY = 32  # [port], one-way
    UNMASK = 33  # [port], one-way
    UNBIND = 34  # [port] -> []
    STATE = 40  # [] -> blob: JSON of the tables (tests and debugging)
    OK = 100
    ERROR = 101  # [code, detail ints...] + blob: the one-line message
    EVENT = 102  # [port], pushed on an evtchn handle's event socket


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


def _fds_from_ancdata(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


_ANCBUFSIZE = socket.CMSG_SPACE(MAX_FDS * 4)


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
                n, ancdata, flags, _ = sock.recvmsg_into([self._buf], _ANCBUFSIZE)
            except OSError as err:
                raise PlatformError(
                    f"grantd.connection: {Op(op).name} to {self.path} failed: {err}"
                ) from None
            got_fds = _fds_from_ancdata(ancdata)
            if n == 0:
                _close_fds(got_fds)
                raise PlatformError(f"grantd.connection: {self.path} closed the connection")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                _close_fds(got_fds)
                raise PlatformError("grantd.connection: reply truncated")
            try:
                reply = Message.decode(memoryview(self._buf)[:n])
            except WireError:
                _close_fds(got_fds)
                raise
        if reply.op == Op.ERROR:
            _close_fds(got_fds)
            raise_error(reply)
        if reply.op != Op.OK:
            _close_fds(got_fds)
            raise WireError(f"grantd.unexpected_reply: op {reply.op} to {Op(op).name}")
        return reply, got_fds

    def post(self, op: Op, ints: Sequence[int]) -> None:
        """Send a one-way message (NOTIFY, UNMASK): no reply comes back."""
        data = Message(op, tuple(ints)).encode()
        with self._lock:
            sock = self._sock
            if sock is None:
                raise self._closed_error()
            try:
                sock.send(data)
            except OSError as err:
                raise PlatformError(
                    f"grantd.connection: {Op(op).name} to {self.path} failed: {err}"
                ) from None

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
    """The service's tables as plain data: grants, maps, ports and clients (tests, debugging)."""
    conn = ServiceConnection(socket_path, Kind.CONTROL, 0, timeout=timeout)
    try:
        reply, _ = conn.request(Op.STATE)
    finally:
        conn.close()
    return json.loads(reply.blob)


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------


class _Endpoint:
    """One socket of the service with its queue of messages the kernel did not take yet."""

    __slots__ = ("sock", "client", "is_events", "outbox", "outbox_bytes", "closed")

    def __init__(self, sock: socket.socket, client: _Client | None, is_events: bool) -> None:
        self.sock = sock
        self.client = client
        self.is_events = is_events
        self.outbox: deque[tuple[bytes, list[int]]] = deque()
        self.outbox_bytes = 0
        self.closed = False


@dataclass(eq=False)
class _File:
    """A granter's memfd as the service holds it (read-write and read-only descriptors)."""

    file_id: int
    fd: int
    ro_fd: int

    def close(self) -> None:
        _close_fds({self.fd, self.ro_fd})


@dataclass(eq=False)
class _Grant:
    granter: int
    ref: int
    target: int
    file: _File
    page: int
    writable: bool
    owner: _Client | None
    maps: int = 0
    revoking: bool = False


class _PortState(enum.Enum):
    UNBOUND = "unbound"
    INTERDOMAIN = "interdomain"


@dataclass(eq=False)
class _Port:
    domid: int
    port: int
    owner: _Client
    state: _PortState
    remote_domid: int
    remote_port: int | None = None
    pending: bool = False
    masked: bool = False


@dataclass(eq=False)
class _Client:
    ep: _Endpoint
    kind: Kind | None = None
    domid: int = -1
    file: _File | None = None
    refs: set[int] = field(default_factory=set)
    maps: dict[int, list[_Grant]] = field(default_factory=dict)
    ports: set[int] = field(default_factory=set)
    events: _Endpoint | None = None


class _RefAllocator:
    """Grant refs of one granting domain: fresh refs first, then the longest-free ref, so a
    stale ref held by a buggy peer is unlikely to name a new grant soon."""

    def __init__(self) -> None:
        self._next = GNTTAB_NR_RESERVED_ENTRIES
        self._free: deque[int] = deque()

    def alloc(self) -> int | None:
        if self._next < NR_GRANT_ENTRIES:
            self._next += 1
            return self._next - 1
        return self._free.popleft() if self._free else None

    def free(self, ref: int) -> None:
        self._free.append(ref)


def _domid_ok(domid: int) -> bool:
    return 0 <= domid < DOMID_FIRST_RESERVED


def _need(msg: Message, n: int, at_least: bool = False) -> None:
    if len(msg.ints) < n if at_least else len(msg.ints) != n:
        raise WireError(
            f"grantd.arity: {Op(msg.op).name} needs {'at least ' if at_least else ''}{n} "
            f"integers, got {len(msg.ints)}"
        )


class GrantService:
    """The grant tables and event channels of every simulated domain behind one socket.

    Single-threaded: `serve_forever()` runs a selector loop until `stop()` (callable from a
    signal handler or another thread).
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._sel = selectors.DefaultSelector()
        self._grants: dict[tuple[int, int], _Grant] = {}
        self._refs: dict[int, _RefAllocator] = {}
        self._ports: dict[int, dict[int, _Port]] = {}
        self._clients: set[_Client] = set()
        self._next_file_id = 1
        self._next_map_id = 1
        self._rbuf = bytearray(MAX_MESSAGE + 1)
        # Descriptors the current handler attaches to its reply (MAP: the granters' memfds).
        self._reply_fds: list[int] = []
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener = self._listen(socket_path)
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._handlers: dict[int, Callable[[_Client, Message, list[int]], Message | None]] = {
            Op.BYE: self._op_bye,
            Op.SHARE: self._op_share,
            Op.UNSHARE: self._op_unshare,
            Op.IS_MAPPED: self._op_is_mapped,
            Op.MAP: self._op_map,
            Op.UNMAP: self._op_unmap,
            Op.COPY: self._op_copy,
            Op.BIND_UNBOUND: self._op_bind_unbound,
            Op.BIND_INTERDOMAIN: self._op_bind_interdomain,
            Op.NOTIFY: self._op_notify,
            Op.UNMASK: self._op_unmask,
            Op.UNBIND: self._op_unbind,
            Op.STATE: self._op_state,
        }
        self._allowed: dict[Kind, frozenset[int]] = {
            Kind.GNTSHR: frozenset({Op.BYE, Op.SHARE, Op.UNSHARE, Op.IS_MAPPED, Op.STATE}),
            Kind.GNTTAB: frozenset({Op.BYE, Op.MAP, Op.UNMAP, Op.COPY, Op.STATE}),
            Kind.EVTCHN: frozenset(
                {
                    Op.BYE,
                    Op.BIND_UNBOUND,
                    Op.BIND_INTERDOMAIN,
                    Op.NOTIFY,
                    Op.UNMASK,
                    Op.UNBIND,
                    Op.STATE,
                }
            ),
            Kind.CONTROL: frozenset({Op.BYE, Op.STATE}),
        }

    # -- socket setup --------------------------------------------------------------------

    @staticmethod
    def _listen(path: str) -> socket.socket:
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a service that died
            else:
                raise PlatformError(f"grantd.socket_in_use: a service already listens on {path}")
            finally:
                probe.close()
        # Bind under a temporary name and rename into place: the socket path exists only once
        # the service accepts connections, so "the file exists" means "ready".
        tmp = f"{path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            sock.bind(tmp)
            sock.listen(128)
            sock.setblocking(False)
            os.rename(tmp, path)
        except OSError as err:
            sock.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise PlatformError(f"grantd.listen: cannot listen on {path}: {err}") from None
        return sock

    # -- loop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask serve_forever() to return (safe from signal handlers and other threads)."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        while not self._stopping:
            for key, mask in self._sel.select():
                what = key.data
                if what == "listen":
                    self._accept()
                elif what == "wake":
                    try:
                        while self._wake_r.recv(64):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    ep: _Endpoint = what
                    if mask & selectors.EVENT_WRITE and not ep.closed:
                        self._flush(ep)
                    if mask & selectors.EVENT_READ and not ep.closed:
                        if ep.is_events:
                            self._read_events_endpoint(ep)
                        else:
                            self._read_client(ep)

    def close(self) -> None:
        """Drop every client, close every descriptor and remove the socket path."""
        for client in list(self._clients):
            self._drop(client)
        for sock in (self._listener, self._wake_r, self._wake_w):
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._sel.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as err:
                log.warning("grantd: accept failed: %s", err)
                return
            sock.setblocking(False)
            ep = _Endpoint(sock, None, False)
            client = _Client(ep)
            ep.client = client
            self._clients.add(client)
            self._sel.register(sock, selectors.EVENT_READ, ep)

    def _read_client(self, ep: _Endpoint) -> None:
        client = ep.client
        assert client is not None
        # Bounded so one busy client cannot starve the others.
        for _ in range(64):
            try:
                n, ancdata, flags, _ = ep.sock.recvmsg_into([self._rbuf], _ANCBUFSIZE)
            except BlockingIOError:
                return
            except OSError:
                self._drop(client)
                return
            fds = _fds_from_ancdata(ancdata)
            if n == 0:
                _close_fds(fds)
                self._drop(client)
                return
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise WireError("grantd.truncated: message or descriptors too large")
                msg = Message.decode(memoryview(self._rbuf)[:n])
                self._dispatch(client, msg, fds)
            except WireError as err:
                log.warning("grantd: dropping client (domid %s): %s", client.domid, err)
                _close_fds(fds)
                self._drop(client)
                return
            except Exception:
                # A bug here must cost one client, not every domain's grants and ports.
                log.exception("grantd: internal error; dropping client (domid %s)", client.domid)
                _close_fds(fds)
                self._drop(client)
                return
            _close_fds(fds)  # handlers take the descriptors they keep out of the list
            if ep.closed:
                return

    def _read_events_endpoint(self, ep: _Endpoint) -> None:
        # Clients never write to their event socket; readable means it was closed.
        try:
            data = ep.sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_endpoint(ep)

    def _dispatch(self, client: _Client, msg: Message, fds: list[int]) -> None:
        if client.kind is None:
            if msg.op != Op.HELLO:
                raise WireError(f"grantd.no_hello: first message is op {msg.op}")
            try:
                self._send(client.ep, self._op_hello(client, msg, fds).encode())
            except WireError:
                raise
            except PlatformError as err:
                self._send(client.ep, error_message(err).encode())
            return
        handler = self._handlers.get(msg.op)
        if handler is None or msg.op not in self._allowed[client.kind]:
            raise WireError(f"grantd.bad_op: op {msg.op} on a {client.kind.name} connection")
        one_way = msg.op in (Op.NOTIFY, Op.UNMASK)
        self._reply_fds = []
        try:
            reply = handler(client, msg, fds)
        except WireError:
            raise
        except PlatformError as err:
            if one_way:
                # Nobody waits for a reply to a one-way message, and the client checks its
                # ports before sending, so only a buggy client gets here: ignore it.
                return
            reply = error_message(err)
        if reply is not None and not client.ep.closed:
            self._send(client.ep, reply.encode(), self._reply_fds)

    # -- sending -------------------------------------------------------------------------

    def _send(self, ep: _Endpoint, data: bytes, fds: Sequence[int] = ()) -> None:
        if ep.closed:
            return
        if not ep.outbox:
            try:
                if fds:
                    ep.sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                else:
                    ep.sock.send(data)
                return
            except BlockingIOError:
                pass
            except OSError:
                self._endpoint_broken(ep)
                return
        # Queued: the descriptors may be closed before the queue drains (the granter may go
        # away), so the queue holds its own duplicates.
        ep.outbox.append((data, [os.dup(fd) for fd in fds]))
        ep.outbox_bytes += len(data)
        if ep.outbox_bytes > MAX_OUTBOX_BYTES:
            log.warning("grantd: client does not read its messages; dropping it")
            self._endpoint_broken(ep)
            return
        if len(ep.outbox) == 1:
            self._sel.modify(ep.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, ep)

    def _flush(self, ep: _Endpoint) -> None:
        while ep.outbox:
            data, fds = ep.outbox[0]
            try:
                if fds:
                    ep.sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                else:
                    ep.sock.send(data)
            except BlockingIOError:
                return
            except OSError:
                self._endpoint_broken(ep)
                return
            ep.outbox.popleft()
            ep.outbox_bytes -= len(data)
            _close_fds(fds)
        self._sel.modify(ep.sock, selectors.EVENT_READ, ep)

    def _endpoint_broken(self, ep: _Endpoint) -> None:
        if ep.is_events:
            self._close_endpoint(ep)
        elif ep.client is not None:
            self._drop(ep.client)

    def _close_endpoint(self, ep: _Endpoint) -> None:
        if ep.closed:
            return
        ep.closed = True
        try:
            self._sel.unregister(ep.sock)
        except (KeyError, ValueError):
            pass
        ep.sock.close()
        for _, fds in ep.outbox:
            _close_fds(fds)
        ep.outbox.clear()

    # -- client lifetime -----------------------------------------------------------------

    def _op_hello(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        _need(msg, 2)
        kind_value, domid = msg.ints
        try:
            kind = Kind(kind_value)
        except ValueError:
            raise WireError(f"grantd.bad_kind: {kind_value}") from None
        if not _domid_ok(domid):
            raise PlatformError(f"grantd.bad_domid: {domid} is not a domain id")
        if kind == Kind.GNTSHR:
            if len(fds) != 1:
                raise WireError("grantd.hello_fd: a gntshr HELLO carries exactly one memfd")
            fd = fds.pop()
            try:
                # A mapper of a read-only grant gets a descriptor opened read-only, so it cannot
                # map the page writable even by calling mmap itself.
                ro_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                ro_fd = fd
            client.file = _File(self._next_file_id, fd, ro_fd)
            self._next_file_id += 1
        elif kind == Kind.EVTCHN:
            if len(fds) != 1:
                raise WireError("grantd.hello_fd: an evtchn HELLO carries exactly one socket")
            try:
                sock = socket.socket(fileno=fds.pop())
            except OSError as err:
                raise WireError(f"grantd.hello_fd: event socket is not a socket: {err}") from None
            sock.setblocking(False)
            client.events = _Endpoint(sock, client, True)
            self._sel.register(sock, selectors.EVENT_READ, client.events)
        client.kind = kind
        client.domid = domid
        return Message(Op.OK)

    def _op_bye(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        self._release(client)
        return Message(Op.OK)

    def _drop(self, client: _Client) -> None:
        """The client went away (closed, crashed, or broke the protocol): release all it held."""
        self._release(client)
        self._close_endpoint(client.ep)
        self._clients.discard(client)

    def _release(self, client: _Client) -> None:
        for ref in list(client.refs):
            self._revoke(self._grants[(client.domid, ref)])
        client.refs.clear()
        if client.file is not None:
            client.file.close()
            client.file = None
        for map_id in list(client.maps):
            self._unmap(client, map_id)
        for port in list(client.ports):
            self._close_port(self._ports[client.domid][port])
        if client.events is not None:
            self._close_endpoint(client.events)
            client.events = None

    # -- grants --------------------------------------------------------------------------

    def _own_grant(self, client: _Client, ref: int) -> _Grant:
        if ref not in client.refs:
            raise GrantError(
                f"grant.unknown_ref: ref {ref} is not shared by this handle of domain {client.domid}"
            )
        return self._grants[(client.domid, ref)]

    def _free_grant(self, grant: _Grant) -> None:
        del self._grants[(grant.granter, grant.ref)]
        self._refs[grant.granter].free(grant.ref)

    def _revoke(self, grant: _Grant) -> bool:
        """End foreign access; a still-mapped grant stays until its last unmap (XSA-396)."""
        if grant.owner is not None:
            grant.owner.refs.discard(grant.ref)
            grant.owner = None
        if grant.maps:
            grant.revoking = True
            return False
        self._free_grant(grant)
        return True

    def _op_share(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        _need(msg, 3, at_least=True)
        target, writable, *pages = msg.ints
        if not _domid_ok(target):
            raise GrantError(f"grant.bad_domid: {target} is not a domain id")
        if len(pages) > MAX_SHARE_PAGES:
            raise GrantError(f"grant.count: {len(pages)} pages > {MAX_SHARE_PAGES} in one share")
        if any(p < 0 or p > (1 << 40) for p in pages):
            raise WireError("grantd.bad_page: page offset out of range")
        if client.file is None:
            raise PlatformError("grantd.closed: this gntshr handle said BYE")
        alloc = self._refs.setdefault(client.domid, _RefAllocator())
        refs: list[int] = []
        for page in pages:
            ref = alloc.alloc()
            if ref is None:
                for r in refs:
                    self._free_grant(self._grants[(client.domid, r)])
                    client.refs.discard(r)
                raise GrantError(
                    f"grant.table_full: domain {client.domid} has no free grant entry "
                    f"({NR_GRANT_ENTRIES} entries)"
                )
            self._grants[(client.domid, ref)] = _Grant(
                client.domid, ref, target, client.file, page, bool(writable), client
            )
            client.refs.add(ref)
            refs.append(ref)
        return Message(Op.OK, tuple(refs))

    def _op_unshare(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        grants = [self._own_grant(client, ref) for ref in msg.ints]
        still = [g.ref for g in grants if not self._revoke(g)]
        if still:
            err = GrantStillMapped(
                f"grant.still_mapped: domain {client.domid} refs {still} are still mapped by "
                f"their peer; they are revoked once unmapped and the pages must not be reused "
                f"(XSA-396)"
            )
            err.refs = tuple(still)  # type: ignore[attr-defined]
            raise err
        return Message(Op.OK)

    def _op_is_mapped(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        grants = [self._own_grant(client, ref) for ref in msg.ints]
        return Message(Op.OK, (int(any(g.maps for g in grants)),))

    def _op_map(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        _need(msg, 3, at_least=True)
        granter, writable, *refs = msg.ints
        if len(refs) > MAX_MAP_REFS:
            raise GrantError(f"grant.count: {len(refs)} refs > {MAX_MAP_REFS} in one map")
        grants = [self._mappable(client, granter, ref, bool(writable)) for ref in refs]
        files: dict[_File, int] = {}
        out: list[int] = []
        for g in grants:
            index = files.setdefault(g.file, len(files))
            out += (index, g.page)
        if len(files) > MAX_FDS:
            raise GrantError(
                f"grant.too_many_files: refs come from {len(files)} handles of domain "
                f"{granter}, at most {MAX_FDS} per map"
            )
        for g in grants:
            g.maps += 1
        map_id = self._next_map_id
        self._next_map_id += 1
        client.maps[map_id] = grants
        self._reply_fds = [f.fd if writable else f.ro_fd for f in files]
        return Message(Op.OK, (map_id, len(files), *out))

    def _mappable(self, client: _Client, granter: int, ref: int, writable: bool) -> _Grant:
        grant = self._grants.get((granter, ref))
        if grant is None:
            raise GrantError(f"grant.unknown_ref: domain {granter} has no grant ref {ref}")
        if grant.target != client.domid:
            raise GrantError(
                f"grant.wrong_domain: ref {ref} of domain {granter} is granted to domain "
                f"{grant.target}, not to domain {client.domid}"
            )
        if grant.revoking:
            raise GrantError(f"grant.revoked: ref {ref} of domain {granter} is being revoked")
        if writable and not grant.writable:
            raise GrantError(
                f"grant.readonly: ref {ref} of domain {granter} is granted read-only, "
                f"asked writable"
            )
        return grant

    def _op_unmap(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        _need(msg, 1)
        (map_id,) = msg.ints
        if map_id not in client.maps:
            raise GrantError(f"grant.unknown_map: map {map_id} is not held by this handle")
        self._unmap(client, map_id)
        return Message(Op.OK)

    def _unmap(self, client: _Client, map_id: int) -> None:
        for grant in client.maps.pop(map_id):
            grant.maps -= 1
            if grant.maps == 0 and grant.revoking:
                self._free_grant(grant)

    def _op_copy(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        _need(msg, 1, at_least=True)
        n = msg.ints[0]
        if not 0 <= n <= MAX_COPY_SEGMENTS:
            raise GrantError(f"grant.copy_count: {n} segments > {MAX_COPY_SEGMENTS}")
        _need(msg, 1 + 5 * n)
        segs = []
        blob_used = 0
        total = 0
        for i in range(n):
            to_grant, domid, ref, offset, length = msg.ints[1 + 5 * i : 6 + 5 * i]
            if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
                raise GrantError(
                    f"grant.copy_bounds: offset {offset} + length {length} exceeds the "
                    f"{PAGE_SIZE}-byte page of ref {ref}"
                )
            grant = self._mappable(client, domid, ref, bool(to_grant))
            segs.append((bool(to_grant), grant, offset, length))
            total += length
            if to_grant:
                blob_used += length
        if total > MAX_COPY_BYTES:
            raise GrantError(f"grant.copy_size: {total} bytes > {MAX_COPY_BYTES} in one copy")
        if blob_used != len(msg.blob):
            raise WireError(f"grantd.copy_blob: {len(msg.blob)} bytes sent, {blob_used} expected")
        out = bytearray()
        pos = 0
        for to_grant, grant, offset, length in segs:
            where = grant.page * PAGE_SIZE + offset
            if to_grant:
                os.pwrite(grant.file.fd, msg.blob[pos : pos + length], where)
                pos += length
            else:
                data = os.pread(grant.file.fd, length, where)
                out += data.ljust(length, b"\0")  # a page past EOF reads as zeroes
        return Message(Op.OK, (), bytes(out))

    # -- event channels ------------------------------------------------------------------

    def _own_port(self, client: _Client, port: int) -> _Port:
        if port not in client.ports:
            raise EventChannelError(
                f"evtchn.unbound_port: port {port} is not bound by this handle of domain "
                f"{client.domid}"
            )
        return self._ports[client.domid][port]

    def _alloc_port(self, client: _Client, state: _PortState, remote_domid: int) -> _Port:
        table = self._ports.setdefault(client.domid, {})
        # Xen hands out the lowest free port.
        for port in range(1, NR_EVENT_CHANNELS):
            if port not in table:
                p = _Port(client.domid, port, client, state, remote_domid)
                table[port] = p
                client.ports.add(port)
                return p
        raise EventChannelError(
            f"evtchn.no_free_port: domain {client.domid} uses all {NR_EVENT_CHANNELS - 1} ports"
        )

    def _op_bind_unbound(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        _need(msg, 1)
        (remote,) = msg.ints
        if not _domid_ok(remote):
            raise EventChannelError(f"evtchn.bad_domid: {remote} is not a domain id")
        p = self._alloc_port(client, _PortState.UNBOUND, remote)
        return Message(Op.OK, (p.port,))

    def _op_bind_interdomain(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        _need(msg, 2)
        remote, rport = msg.ints
        rp = self._ports.get(remote, {}).get(rport)
        if rp is None:
            raise EventChannelError(f"evtchn.unknown_port: domain {remote} has no port {rport}")
        if rp.state is not _PortState.UNBOUND or rp.remote_domid != client.domid:
            raise EventChannelError(
                f"evtchn.not_offered: port {rport} of domain {remote} is not an unbound port "
                f"offered to domain {client.domid}"
            )
        lp = self._alloc_port(client, _PortState.INTERDOMAIN, remote)
        lp.remote_port = rport
        rp.state = _PortState.INTERDOMAIN
        rp.remote_domid = client.domid
        rp.remote_port = lp.port
        # Xen's evtchn_bind_interdomain(): "We may have lost notifications on the remote
        # unbound port. Fix that up here by conservatively always setting a notification on
        # the local port."
        self._set_pending(lp)
        return Message(Op.OK, (lp.port,))

    def _set_pending(self, p: _Port) -> None:
        if p.masked:
            p.pending = True
            return
        # Delivery masks the port until the handle unmasks it, as the Linux evtchn driver does.
        p.masked = True
        p.pending = False
        events = p.owner.events
        if events is not None:
            self._send(events, Message(Op.EVENT, (p.port,)).encode())

    def _op_notify(self, client: _Client, msg: Message, fds: list[int]) -> None:
        _need(msg, 1)
        p = self._own_port(client, msg.ints[0])
        if p.state is _PortState.INTERDOMAIN:
            assert p.remote_port is not None
            self._set_pending(self._ports[p.remote_domid][p.remote_port])
        # Xen's evtchn_send(): an unbound port silently drops the notification.
        return None

    def _op_unmask(self, client: _Client, msg: Message, fds: list[int]) -> None:
        _need(msg, 1)
        p = self._own_port(client, msg.ints[0])
        p.masked = False
        if p.pending:
            self._set_pending(p)
        return None

    def _op_unbind(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        _need(msg, 1)
        self._close_port(self._own_port(client, msg.ints[0]))
        return Message(Op.OK)

    def _close_port(self, p: _Port) -> None:
        if p.state is _PortState.INTERDOMAIN:
            assert p.remote_port is not None
            rp = self._ports[p.remote_domid][p.remote_port]
            # Xen's evtchn_close(): the remote end becomes unbound, offered back to us.
            rp.state = _PortState.UNBOUND
            rp.remote_domid = p.domid
            rp.remote_port = None
        del self._ports[p.domid][p.port]
        p.owner.ports.discard(p.port)

    # -- state ---------------------------------------------------------------------------

    def state(self) -> dict:
        """The tables as plain data."""
        return {
            "grants": [
                {
                    "domid": g.granter,
                    "ref": g.ref,
                    "target": g.target,
                    "writable": g.writable,
                    "maps": g.maps,
                    "revoking": g.revoking,
                }
                for g in self._grants.values()
            ],
            "maps": [
                {"domid": c.domid, "map_id": mid, "refs": [[g.granter, g.ref] for g in gs]}
                for c in self._clients
                for mid, gs in c.maps.items()
            ],
            "ports": [
                {
                    "domid": p.domid,
                    "port": p.port,
                    "state": p.state.value,
                    "remote_domid": p.remote_domid,
                    "remote_port": p.remote_port,
                    "pending": p.pending,
                    "masked": p.masked,
                }
                for table in self._ports.values()
                for p in table.values()
            ],
            "clients": [
                {"kind": c.kind.name.lower(), "domid": c.domid}
                for c in self._clients
                if c.kind is not None and c.kind != Kind.CONTROL
            ],
        }

    def _op_state(self, client: _Client, msg: Message, fds: list[int]) -> Message:
        return Message(Op.OK, (), json.dumps(self.state()).encode())


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_grantd(socket_path: str, *, ready_fd: int | None = None) -> None:
    """Serve in the foreground until SIGTERM or SIGINT, then clean up and return.

    The socket path appears only once the service accepts connections; if `ready_fd` is
    given, "READY\\n" is also written to it then and it is closed (as xenstored does).
    """
    service = GrantService(socket_path)
    previous = {}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: service.stop())
    try:
        if ready_fd is not None:
            try:
                os.write(ready_fd, b"READY\n")
            finally:
                os.close(ready_fd)
        service.serve_forever()
    finally:
        service.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xentools.platform.sim.grantd",
        description="Software Xen grant tables and event channels for every simulated domain.",
    )
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--ready-fd", type=int, default=None, help="write READY to this fd once listening")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        run_grantd(args.socket, ready_fd=args.ready_fd)
    except PlatformError as err:
        print(f"grantd: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
