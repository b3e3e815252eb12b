"""Event channels for the software Xen (the client side of grantd's port tables).

Owns: SoftwareEventChannels, one libxenevtchn-like handle: a request connection to grantd
and a socketpair on which grantd pushes one EVENT message per delivered port.
Must not: keep port state beyond the set of ports this handle bound (grantd owns pending
and mask bits), or block in pending().

The handle's fd is the local end of that socketpair, so it is readable exactly while a
delivered port waits to be taken by pending(); replies to requests travel on the other
connection and can never be mistaken for events. notify() and unmask() are one-way messages,
so an event costs one message from the notifier to grantd and one from grantd to the peer.
A notify on a port whose peer has closed is dropped silently, as Xen's evtchn_send() drops
it on an unbound port.
"""

from __future__ import annotations

import socket
import threading

from xentools.platform.interface import EventChannelError, EventChannels
from xentools.platform.sim.grantd import (
    DOMID_FIRST_RESERVED,
    HEADER,
    Kind,
    Message,
    Op,
    ServiceConnection,
    WireError,
)


class SoftwareEventChannels(EventChannels):
    """An event channel handle of domain `domid` on the software Xen."""

    def __init__(self, socket_path: str, domid: int) -> None:
        self.domid = domid
        self._lock = threading.Lock()
        local, remote = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            self._conn = ServiceConnection(socket_path, Kind.EVTCHN, domid, fds=[remote.fileno()])
        except BaseException:
            local.close()
            raise
        finally:
            remote.close()  # grantd holds its own copy now
        local.setblocking(False)
        self._events: socket.socket | None = local
        self._ports: set[int] = set()

    def _check_port(self, port: int) -> None:
        if port not in self._ports:
            raise EventChannelError(
                f"evtchn.unbound_port: port {port!r} is not bound by this handle"
            )

    def _check_open(self) -> socket.socket:
        if self._events is None:
            raise EventChannelError("evtchn.closed: this event channel handle is closed")
        return self._events

    def fileno(self) -> int:
        return self._check_open().fileno()

    def bind_unbound(self, remote_domid: int) -> int:
        if not isinstance(remote_domid, int) or not 0 <= remote_domid < DOMID_FIRST_RESERVED:
            raise EventChannelError(f"evtchn.bad_domid: {remote_domid!r} is not a domain id")
        self._check_open()
        reply, _ = self._conn.request(Op.BIND_UNBOUND, (remote_domid,))
        port = reply.ints[0]
        with self._lock:
            self._ports.add(port)
        return port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        if not isinstance(remote_domid, int) or not 0 <= remote_domid < DOMID_FIRST_RESERVED:
            raise EventChannelError(f"evtchn.bad_domid: {remote_domid!r} is not a domain id")
        if not isinstance(remote_port, int) or remote_port <= 0:
            raise EventChannelError(f"evtchn.unknown_port: {remote_port!r} is not a port")
        self._check_open()
        # Add the port under the lock together with the reply, so pending() never drops the
        # event grantd raises on a freshly bound port (see grantd's bind_interdomain).
        with self._lock:
            reply, _ = self._conn.request(Op.BIND_INTERDOMAIN, (remote_domid, remote_port))
            port = reply.ints[0]
            self._ports.add(port)
        return port

    def notify(self, port: int) -> None:
        self._check_open()
        self._check_port(port)
        self._conn.post(Op.NOTIFY, (port,))

    def pending(self) -> int | None:
        events = self._check_open()
        while True:
            try:
                data = events.recv(HEADER.size + 8)
            except BlockingIOError:
                return None
            except OSError as err:
                raise EventChannelError(f"evtchn.service_gone: event socket failed: {err}") from None
            if not data:
                raise EventChannelError("evtchn.service_gone: grantd closed the event socket")
            try:
                msg = Message.decode(data)
            except WireError as err:
                raise EventChannelError(f"evtchn.bad_event: {err}") from None
            if msg.op != Op.EVENT or len(msg.ints) != 1:
                raise EventChannelError(f"evtchn.bad_event: op {msg.op} on the event socket")
            port = msg.ints[0]
            with self._lock:
                if port in self._ports:
                    return port
            # A port unbound after grantd delivered its event: nothing to report.

    def unmask(self, port: int) -> None:
        self._check_open()
        self._check_port(port)
        self._conn.post(Op.UNMASK, (port,))

    def unbind(self, port: int) -> None:
        self._check_open()
        self._check_port(port)
        self._conn.request(Op.UNBIND, (port,))
        with self._lock:
            self._ports.discard(port)

    def close(self) -> None:
        if self._events is None:
            return
        self._conn.close()  # BYE: grantd closes every port of this handle
        self._events.close()
        self._events = None
        self._ports.clear()

    def __enter__(self) -> SoftwareEventChannels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
