"""Event channels for the software Xen: one libxenevtchn-like handle.

Owns: SoftwareEventChannels: the handle's doorbell (a pipe: its read end is the handle's
fd), a request connection to grantd for the control plane (bind, unbind, and asking where a
port's events travel now), and for each bound port its link: the channel page holding its
state word (pending, masked, ready) and, once interdomain-bound, the peer's word and a
write end of the peer handle's doorbell, both handed over by grantd (the peer's at bind
time for the binder, on the first notify for the side that offered the port).
`direct_link(port)` hands a compiled wait loop (blkback_ringloop.c's xt_wait) the raw parts of
a bound port (doorbell descriptors, word addresses, the words' bits) so it applies the same
transitions itself; `links_changed` tells it when a relink made them stale.
Must not: send a notification, a delivery or an unmask through grantd (they are atomic
operations on the channel page and one byte written to a pipe, evtchn_channel.py), or block
in pending() or notify() (except to ask grantd once where a port went after its peer closed).

A notify is a compare-and-swap on the peer's word; when it delivers (the port was neither
pending nor masked) it rings the peer's doorbell once (one byte). pending() takes one byte
of the own doorbell and returns a port whose word says ready, so the fd is readable exactly
while a delivered port waits to be taken. A notify on a port whose peer has closed is
dropped silently, as Xen's evtchn_send() drops it on an unbound port.

Why a pipe: measured against an eventfd, a socketpair and a datagram socket (ping-pong
between two processes on the 2-core CI machine), pipe and eventfd were the fastest and
within noise of each other; a pipe's write end can be reopened through /proc, so grantd
gives every notifier its own open file description, non-blocking: a peer can clear
O_NONBLOCK on its own descriptions only, and a full pipe means its reader is awake anyway,
so a notify never blocks whatever the peer does. (A shared eventfd offers no such thing: a
peer clearing its O_NONBLOCK and filling its counter would block every notifier.)
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from xentools.platform.interface import EventChannelError, EventChannels, PlatformError
from xentools.platform.sim.evtchn_channel import (
    BOUND,
    CLOSED,
    DELIVERED,
    GONE,
    MASKED,
    MAX_TRIES,
    PENDING,
    READY,
    WORD_STRIDE,
    ChannelPage,
    machine_cas,
)
from xentools.platform.sim.grantd_wire import (
    DOMID_FIRST_RESERVED,
    Kind,
    Message,
    Op,
    ServiceConnection,
    close_fds,
)


@dataclass(frozen=True)
class DirectLink:
    """A bound port's raw parts (SoftwareEventChannels.direct_link): descriptors, word
    addresses, and the bits of the words (evtchn_channel's, named here once for C)."""

    doorbell: int
    own_ring: int
    peer_ring: int
    own_word: int
    peer_word: int
    generation: int
    pending: int = PENDING
    masked: int = MASKED
    ready: int = READY
    bound: int = BOUND
    closed: int = CLOSED
    tries: int = MAX_TRIES
    kind: str = "words"  # EventChannels.direct_link's kinds: the channel words themselves


class _Link:
    """Where one bound port's events travel (this process owns the page and the doorbell)."""

    __slots__ = ("page", "end", "peer_end", "peer_doorbell")

    def __init__(self, page: ChannelPage, end: int, peer_end: int, peer_doorbell: int) -> None:
        self.page = page
        self.end = end
        self.peer_end = peer_end
        self.peer_doorbell = peer_doorbell

    def close(self) -> None:
        self.page.close()
        if self.peer_doorbell >= 0:
            close_fds([self.peer_doorbell])
            self.peer_doorbell = -1


def _ring(doorbell: int) -> None:
    try:
        os.write(doorbell, b"\x01")
    except BlockingIOError:
        pass  # the pipe is full: its reader is awake already and takes every ready port
    except BrokenPipeError:
        pass  # the peer handle is gone: nobody to wake


class SoftwareEventChannels(EventChannels):
    """An event channel handle of domain `domid` on the software Xen."""

    def __init__(self, socket_path: str, domid: int) -> None:
        self.domid = domid
        self._lock = threading.Lock()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._conn = ServiceConnection(socket_path, Kind.EVTCHN, domid, fds=[write_end])
        except BaseException:
            close_fds([read_end, write_end])
            raise
        self._doorbell = read_end
        self._ring_own = write_end  # for the events this handle delivers to itself
        self._links: dict[int, _Link] = {}
        self.links_changed = 0  # counts relinks and unbinds: a direct_link() older is stale

    # -- helpers ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._doorbell < 0:
            raise EventChannelError("evtchn.closed: this event channel handle is closed")

    def _link_of(self, port: int) -> _Link:
        self._check_open()
        link = self._links.get(port)
        if link is None:
            raise EventChannelError(
                f"evtchn.unbound_port: port {port!r} is not bound by this handle"
            )
        return link

    @staticmethod
    def _new_link(reply: Message, fds: list[int]) -> tuple[int, _Link]:
        try:
            port, end, peer_end, _remote_port = reply.ints
            if len(fds) != (2 if peer_end >= 0 else 1) or end not in (0, 1):
                raise ValueError
            page = ChannelPage(fds[0])
        except (ValueError, OSError, PlatformError):
            close_fds(fds)
            raise PlatformError("grantd.bad_reply: an event channel reply does not match") from None
        return port, _Link(page, end, peer_end, fds[1] if peer_end >= 0 else -1)

    def _relink(self, port: int) -> _Link:
        """Ask grantd where `port`'s events travel now (its peer bound it, or closed)."""
        reply, fds = self._conn.request(Op.LINK, (port,))
        _, link = self._new_link(reply, fds)
        self.links_changed += 1
        self._links.pop(port).close()
        self._links[port] = link
        return link

    # -- EventChannels ---------------------------------------------------------------------

    def fileno(self) -> int:
        self._check_open()
        return self._doorbell

    def bind_unbound(self, remote_domid: int) -> int:
        if not isinstance(remote_domid, int) or not 0 <= remote_domid < DOMID_FIRST_RESERVED:
            raise EventChannelError(f"evtchn.bad_domid: {remote_domid!r} is not a domain id")
        with self._lock:
            self._check_open()
            port, link = self._new_link(*self._conn.request(Op.BIND_UNBOUND, (remote_domid,)))
            self._links[port] = link
        return port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        if not isinstance(remote_domid, int) or not 0 <= remote_domid < DOMID_FIRST_RESERVED:
            raise EventChannelError(f"evtchn.bad_domid: {remote_domid!r} is not a domain id")
        if not isinstance(remote_port, int) or remote_port <= 0:
            raise EventChannelError(f"evtchn.unknown_port: {remote_port!r} is not a port")
        with self._lock:
            self._check_open()
            reply = self._conn.request(Op.BIND_INTERDOMAIN, (remote_domid, remote_port))
            port, link = self._new_link(*reply)
            self._links[port] = link
            # grantd raised the event Xen raises on a new interdomain port (it starts ready);
            # ring for it now that pending() knows the port.
            _ring(self._ring_own)
        return port

    def direct_link(self, port: int) -> DirectLink | None:
        """What a compiled wait loop needs to take, unmask and send `port`'s events itself
        with the transitions of evtchn_channel (blkback_ringloop.c's xt_wait), or None where
        it cannot (no machine compare-and-swap, the peer not bound yet, only port of the
        handle not this one). Valid until `links_changed` changes (a relink unmaps the page);
        the caller hands back to this object every case the loop leaves (a CLOSED word)."""
        with self._lock:
            link = self._links.get(port)
            if link is None or len(self._links) != 1 or link.peer_end < 0 or machine_cas() is None:
                return None
            word = link.page.word(link.end)
            if word & CLOSED or not word & BOUND:
                return None
            return DirectLink(
                doorbell=self._doorbell, own_ring=self._ring_own, peer_ring=link.peer_doorbell,
                own_word=link.page.addr + link.end * WORD_STRIDE,
                peer_word=link.page.addr + link.peer_end * WORD_STRIDE,
                generation=self.links_changed,
            )

    def notify(self, port: int) -> None:
        with self._lock:
            link = self._links.get(port) or self._link_of(port)
            word = link.page.word(link.end)
            if word & CLOSED or (word & BOUND and link.peer_end < 0):
                link = self._relink(port)  # the peer bound the port, or closed it
                word = link.page.word(link.end)
            if word & CLOSED or not word & BOUND or link.peer_end < 0:
                return  # unbound: dropped, as Xen's evtchn_send() does
            if link.page.raise_event(link.peer_end) == DELIVERED:
                _ring(link.peer_doorbell)

    def pending(self) -> int | None:
        with self._lock:
            self._check_open()
            try:
                os.read(self._doorbell, 1)
            except BlockingIOError:
                return None
            port = self._take_ready()
            if port is not None:
                return port
            # A ring with nothing ready: a port unbound since, or bytes a peer wrote on its
            # own. Drain them all at once (a peer filling the pipe costs one pass, not one per
            # byte), then ring again for every port still ready: their rings may have gone
            # with the rest, and each delivery must keep its byte.
            try:
                while os.read(self._doorbell, 65536):
                    pass
            except BlockingIOError:
                pass
            for link in self._links.values():
                if link.page.word(link.end) & READY:
                    _ring(self._ring_own)
            return None

    def _take_ready(self) -> int | None:
        moved = []
        for port, link in self._links.items():
            taken = link.page.take(link.end)
            if taken == DELIVERED:
                return port
            if taken == GONE:
                moved.append(port)
        for port in moved:  # their peer closed: the ready bit moved with the port
            link = self._relink(port)
            if link.page.take(link.end) == DELIVERED:
                return port
        return None

    def unmask(self, port: int) -> None:
        with self._lock:
            link = self._links.get(port) or self._link_of(port)
            done = link.page.unmask(link.end)
            if done == GONE:
                link = self._relink(port)
                done = link.page.unmask(link.end)
            if done == DELIVERED:
                _ring(self._ring_own)

    def unbind(self, port: int) -> None:
        with self._lock:
            self._link_of(port)
            self._conn.request(Op.UNBIND, (port,))
            self.links_changed += 1
            self._links.pop(port).close()

    def close(self) -> None:
        with self._lock:
            if self._doorbell < 0:
                return
            self._conn.close()  # BYE: grantd closes every port of this handle
            for link in self._links.values():
                link.close()
            self._links.clear()
            close_fds([self._doorbell, self._ring_own])
            self._doorbell = self._ring_own = -1

    def __enter__(self) -> SoftwareEventChannels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
