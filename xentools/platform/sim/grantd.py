"""grantd: the software Xen's grant tables and event channels, one service for every domain.

Owns: the daemon (`python -m xentools.platform.sim.grantd --socket PATH`, run_grantd(), run
through service.serve() as xenstored is): the listening socket, one connection per handle,
HELLO, dispatch of each request to the grant service (grantd_grants.py) or the event service
(grantd_events.py), STATE, and releasing everything a handle held when it says BYE, breaks
the protocol or dies.
Must not: hold or touch granted memory except for grant copy, be on the path of an event
notification (those go directly between the two processes: evtchn_channel.py), know
anything about blkif, or let one client's bad message hurt another client (a malformed
message closes that client only).

The wire format is grantd_wire.py's. Each connection is one handle of libxengntshr,
libxengnttab or libxenevtchn (or a control connection that only asks STATE).
"""

from __future__ import annotations

import array
import json
import logging
import os
import resource
import selectors
import socket
import sys
from collections import deque
from collections.abc import Callable, Sequence

from xentools.platform.interface import PlatformError
from xentools.platform.sim.grantd_events import EventClient, EventTable
from xentools.platform.sim.grantd_grants import GrantClient, GrantTable
from xentools.platform.sim.grantd_wire import (
    ANCBUFSIZE,
    MAX_MESSAGE,
    Kind,
    Message,
    Op,
    Reply,
    WireError,
    close_fds,
    domid_ok,
    error_message,
    fds_from_ancdata,
    need_ints,
    query_state,
    write_memfd,
)
from xentools.platform.sim.service import daemon_main, serve

__all__ = ["GrantService", "Message", "Op", "main", "query_state", "run_grantd"]

log = logging.getLogger("xentools.grantd")

# A client that stops reading its replies is cut off instead of growing our memory.
MAX_OUTBOX_BYTES = 4 * 1024 * 1024


class _Client:
    """One connection: its socket, the replies the kernel did not take yet, and what the
    handle holds in the grant or event service."""

    __slots__ = ("sock", "outbox", "outbox_bytes", "closed", "kind", "domid", "grants", "events")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.outbox: deque[tuple[bytes, list[int]]] = deque()
        self.outbox_bytes = 0
        self.closed = False
        self.kind: Kind | None = None
        self.domid = -1
        self.grants: GrantClient | None = None
        self.events: EventClient | None = None


class GrantService:
    """The grant tables and event channels of every simulated domain behind one socket.

    Single-threaded: `serve_forever()` runs a selector loop until `stop()` (callable from a
    signal handler or another thread).
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._sel = selectors.DefaultSelector()
        self._grant_table = GrantTable()
        self._event_table = EventTable()
        self._clients: set[_Client] = set()
        self._rbuf = bytearray(MAX_MESSAGE + 1)
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener = self._listen(socket_path)
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        grants, events = self._grant_table, self._event_table
        # op -> (handler, which service record of the client it takes)
        self._handlers: dict[int, tuple[Callable[..., Reply], str]] = {
            Op.SHARE: (grants.op_share, "grants"),
            Op.UNSHARE: (grants.op_unshare, "grants"),
            Op.IS_MAPPED: (grants.op_is_mapped, "grants"),
            Op.MAP: (grants.op_map, "grants"),
            Op.UNMAP: (grants.op_unmap, "grants"),
            Op.COPY: (grants.op_copy, "grants"),
            Op.BIND_UNBOUND: (events.op_bind_unbound, "events"),
            Op.BIND_INTERDOMAIN: (events.op_bind_interdomain, "events"),
            Op.LINK: (events.op_link, "events"),
            Op.UNBIND: (events.op_unbind, "events"),
        }
        self._allowed: dict[Kind, frozenset[int]] = {
            Kind.GNTSHR: frozenset({Op.BYE, Op.SHARE, Op.UNSHARE, Op.IS_MAPPED, Op.STATE}),
            Kind.GNTTAB: frozenset({Op.BYE, Op.MAP, Op.UNMAP, Op.COPY, Op.STATE}),
            Kind.EVTCHN: frozenset(
                {Op.BYE, Op.BIND_UNBOUND, Op.BIND_INTERDOMAIN, Op.LINK, Op.UNBIND, Op.STATE}
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
                    client: _Client = what
                    if mask & selectors.EVENT_WRITE and not client.closed:
                        self._flush(client)
                    if mask & selectors.EVENT_READ and not client.closed:
                        self._read_client(client)

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
            client = _Client(sock)
            self._clients.add(client)
            self._sel.register(sock, selectors.EVENT_READ, client)

    def _read_client(self, client: _Client) -> None:
        # Bounded so one busy client cannot starve the others.
        for _ in range(64):
            try:
                n, ancdata, flags, _ = client.sock.recvmsg_into([self._rbuf], ANCBUFSIZE)
            except BlockingIOError:
                return
            except OSError:
                self._drop(client)
                return
            fds = fds_from_ancdata(ancdata)
            if n == 0:
                close_fds(fds)
                self._drop(client)
                return
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise WireError("grantd.truncated: message or descriptors too large")
                msg = Message.decode(memoryview(self._rbuf)[:n])
                self._dispatch(client, msg, fds)
            except WireError as err:
                log.warning("grantd: dropping client (domid %s): %s", client.domid, err)
                close_fds(fds)
                self._drop(client)
                return
            except Exception:
                # A bug here must cost one client, not every domain's grants and ports.
                log.exception("grantd: internal error; dropping client (domid %s)", client.domid)
                close_fds(fds)
                self._drop(client)
                return
            close_fds(fds)  # handlers take the descriptors they keep out of the list
            if client.closed:
                return

    def _dispatch(self, client: _Client, msg: Message, fds: list[int]) -> None:
        if client.kind is None:
            if msg.op != Op.HELLO:
                raise WireError(f"grantd.no_hello: first message is op {msg.op}")
            try:
                reply: Reply = self._op_hello(client, msg, fds)
            except WireError:
                raise
            except PlatformError as err:
                reply = error_message(err), []
            self._send(client, reply[0].encode())
            return
        if msg.op not in self._allowed[client.kind]:
            raise WireError(f"grantd.bad_op: op {msg.op} on a {client.kind.name} connection")
        reply_fds: list[int] = []
        owned: list[int] = []
        try:
            if msg.op == Op.BYE:
                self._release(client)
                reply = Message(Op.OK)
            elif msg.op == Op.STATE:
                data = json.dumps(self.state()).encode()
                owned = reply_fds = [write_memfd("xentools-grantd-state", data)]
                reply = Message(Op.OK, (len(data),))
            else:
                handler, record = self._handlers[msg.op]
                target = getattr(client, record)
                if target is None:
                    raise PlatformError("grantd.closed: this handle said BYE")
                reply, reply_fds, *after = handler(target, msg, fds)
                owned = after[0] if after else []
        except WireError:
            raise
        except PlatformError as err:
            close_fds(owned)
            reply, reply_fds, owned = error_message(err), [], []
        try:
            if not client.closed:
                self._send(client, reply.encode(), reply_fds)
        finally:
            close_fds(owned)

    # -- sending -------------------------------------------------------------------------

    def _send(self, client: _Client, data: bytes, fds: Sequence[int] = ()) -> None:
        if client.closed:
            return
        if not client.outbox and self._try_send(client, data, fds) is not False:
            return  # sent, or the client is gone
        # Queued: the descriptors may be closed before the queue drains (the granter may go
        # away), so the queue holds its own duplicates.
        client.outbox.append((data, [os.dup(fd) for fd in fds]))
        client.outbox_bytes += len(data)
        if client.outbox_bytes > MAX_OUTBOX_BYTES:
            log.warning("grantd: client does not read its replies; dropping it")
            self._drop(client)
            return
        if len(client.outbox) == 1:
            self._sel.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _try_send(self, client: _Client, data: bytes, fds: Sequence[int]) -> bool | None:
        """One message with its descriptors, without blocking: True once the kernel took it,
        False when the socket is full, None when the client is gone (it has been dropped)."""
        try:
            if fds:
                client.sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                client.sock.send(data)
        except BlockingIOError:
            return False
        except OSError:
            self._drop(client)
            return None
        return True

    def _flush(self, client: _Client) -> None:
        while client.outbox:
            data, fds = client.outbox[0]
            if not self._try_send(client, data, fds):
                return
            client.outbox.popleft()
            client.outbox_bytes -= len(data)
            close_fds(fds)
        self._sel.modify(client.sock, selectors.EVENT_READ, client)

    # -- client lifetime -----------------------------------------------------------------

    def _op_hello(self, client: _Client, msg: Message, fds: list[int]) -> Reply:
        need_ints(msg, 2)
        kind_value, domid = msg.ints
        try:
            kind = Kind(kind_value)
        except ValueError:
            raise WireError(f"grantd.bad_kind: {kind_value}") from None
        if not domid_ok(domid):
            raise PlatformError(f"grantd.bad_domid: {domid} is not a domain id")
        if kind == Kind.GNTSHR:
            if len(fds) != 1:
                raise WireError("grantd.hello_fd: a gntshr HELLO carries exactly one memfd")
            client.grants = self._grant_table.open_sharer(domid, fds.pop())
        elif kind == Kind.GNTTAB:
            client.grants = self._grant_table.open_mapper(domid)
        elif kind == Kind.EVTCHN:
            if len(fds) != 1:
                raise WireError("grantd.hello_fd: an evtchn HELLO carries exactly one pipe end")
            client.events = self._event_table.open_handle(domid, fds[0])
            fds.pop()
        client.kind = kind
        client.domid = domid
        return Message(Op.OK), []

    def _drop(self, client: _Client) -> None:
        """The client went away (closed, crashed, or broke the protocol): release all it held."""
        self._release(client)
        if not client.closed:
            client.closed = True
            try:
                self._sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            client.sock.close()
            for _, fds in client.outbox:
                close_fds(fds)
            client.outbox.clear()
        self._clients.discard(client)

    def _release(self, client: _Client) -> None:
        grants, client.grants = client.grants, None
        if grants is not None:
            self._grant_table.release(grants)
        events, client.events = client.events, None
        if events is not None:
            self._event_table.release(events)

    # -- state ---------------------------------------------------------------------------

    def state(self) -> dict:
        """The tables as plain data."""
        return {
            **self._grant_table.state(),
            **self._event_table.state(),
            "clients": [
                {"kind": c.kind.name.lower(), "domid": c.domid}
                for c in self._clients
                if c.kind is not None and c.kind != Kind.CONTROL
            ],
        }


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_grantd(socket_path: str, *, ready_fd: int | None = None) -> None:
    """Serve in the foreground until SIGTERM or SIGINT, then clean up and return.

    The socket path appears only once the service accepts connections; if `ready_fd` is
    given, "READY\\n" is also written to it then and it is closed (as xenstored does).
    """
    # Every event channel holds its page's memfd here: allow as many as the system does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("grantd: could not raise the open file limit from %d", soft)
    serve(GrantService(socket_path), ready_fd)


def main(argv: Sequence[str] | None = None) -> int:
    return daemon_main(
        "xentools.platform.sim.grantd",
        "Software Xen grant tables and event channels for every simulated domain.",
        lambda args: run_grantd(args.socket, ready_fd=args.ready_fd),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
