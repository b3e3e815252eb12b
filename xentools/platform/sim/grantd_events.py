"""grantd's event service: the event channel port table of every simulated domain.

Owns: ports (per domain, from 1, port 0 never valid, to 4095, the 2-level ABI limit), their
binding (unbound and offered to a domain, or interdomain), the channel page of each binding
(evtchn_channel.py) and the doorbell of each evtchn handle (the write end of its pipe),
reopened for each peer at bind time (its own non-blocking open file description) so that
notifications travel directly between the two processes; and what a handle leaves behind
when it goes away. This is the control plane: bind, close and crash clean-up.
Must not: be on the path of a notification (notify, delivery, unmask happen on the channel
page and the pipes, never here), write to a doorbell, know about sockets or grants, or know
blkif.

Semantics, following Xen:
- Xen hands out the lowest free port.
- bind_interdomain conservatively raises an event on the new local port, as Xen's
  evtchn_bind_interdomain() does ("we may have lost notifications on the remote unbound
  port"): the port starts delivered (masked and ready), its handle rings its own doorbell.
- Closing one end of an interdomain channel (unbind or the client going away) leaves the
  other end unbound, offered back to the closer's domain, as Xen's evtchn_close() does; a
  notify on an unbound port is dropped, as evtchn_send() drops it on ECS_UNBOUND. The
  survivor's port moves to a fresh page (keeping its pending, masked and ready bits), so the
  closer, which may still map the old page, can no longer touch it.
"""

from __future__ import annotations

import enum
import fcntl
import os
import stat
from dataclasses import dataclass, field

from xentools.platform.interface import EventChannelError, PlatformError
from xentools.platform.sim.evtchn_channel import (
    BOUND,
    CLOSED,
    MASKED,
    PENDING,
    PORT_STATE,
    READY,
    ChannelPage,
    create_page_fd,
)
from xentools.platform.sim.grantd_wire import (
    NR_EVENT_CHANNELS,
    Message,
    Op,
    Reply,
    WireError,
    close_fds,
    domid_ok,
    need_ints,
)


class PortState(enum.Enum):
    UNBOUND = "unbound"
    INTERDOMAIN = "interdomain"


@dataclass(eq=False)
class EventClient:
    """One evtchn handle: its domain, its doorbell (a pipe's write end) and its ports."""

    domid: int
    doorbell: int
    ports: set[int] = field(default_factory=set)

    def doorbell_for_a_peer(self) -> int:
        """A new non-blocking open file description of the doorbell, for one notifier: its
        flags are that notifier's alone (see evtchn.py)."""
        try:
            return os.open(
                f"/proc/self/fd/{self.doorbell}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError as err:
            raise EventChannelError(f"evtchn.doorbell: cannot reopen the peer's doorbell: {err}") from None


@dataclass(eq=False)
class _Port:
    domid: int
    port: int
    owner: EventClient
    state: PortState
    remote_domid: int
    page: ChannelPage
    end: int  # which word of the page is this port's
    remote_port: int | None = None


def _is_pipe_write_end(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode) and (
            fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        )
    except OSError:
        return False


class EventTable:
    """The port tables of every domain. Each op_* handler takes the client and its request
    and returns the reply with the descriptors it carries (which stay ours); errors are
    raised."""

    def __init__(self) -> None:
        self._ports: dict[int, dict[int, _Port]] = {}

    def open_handle(self, domid: int, doorbell: int) -> EventClient:
        """An evtchn handle of `domid` woken through the pipe `doorbell` (now owned here)."""
        if not _is_pipe_write_end(doorbell):
            raise WireError("grantd.hello_fd: an evtchn HELLO carries the write end of a pipe")
        return EventClient(domid, doorbell)

    def release(self, client: EventClient) -> None:
        """The handle said BYE or went away: close every port it bound."""
        for port in list(client.ports):
            self._close_port(self._ports[client.domid][port])
        if client.doorbell >= 0:
            close_fds([client.doorbell])
            client.doorbell = -1

    # -- ports -----------------------------------------------------------------------------

    def _own_port(self, client: EventClient, port: int) -> _Port:
        if port not in client.ports:
            raise EventChannelError(
                f"evtchn.unbound_port: port {port} is not bound by this handle of domain "
                f"{client.domid}"
            )
        return self._ports[client.domid][port]

    def _alloc_port(
        self, client: EventClient, state: PortState, remote_domid: int, page: ChannelPage, end: int
    ) -> _Port:
        table = self._ports.setdefault(client.domid, {})
        for port in range(1, NR_EVENT_CHANNELS):
            if port not in table:
                p = _Port(client.domid, port, client, state, remote_domid, page, end)
                table[port] = p
                client.ports.add(port)
                return p
        raise EventChannelError(
            f"evtchn.no_free_port: domain {client.domid} uses all {NR_EVENT_CHANNELS - 1} ports"
        )

    def _link(self, p: _Port, doorbell: int | None = None) -> Reply:
        """Where `p`'s events travel: its page and word, and the peer's word and doorbell
        (`doorbell`, when the caller reopened it already)."""
        if p.state is PortState.INTERDOMAIN:
            assert p.remote_port is not None
            rp = self._ports[p.remote_domid][p.remote_port]
            if doorbell is None:
                doorbell = rp.owner.doorbell_for_a_peer()
            return (
                Message(Op.OK, (p.port, p.end, rp.end, rp.port)),
                [p.page.fd, doorbell],
                [doorbell],
            )
        return Message(Op.OK, (p.port, p.end, -1, -1)), [p.page.fd], []

    def op_bind_unbound(self, client: EventClient, msg: Message, fds: list[int]) -> Reply:
        need_ints(msg, 1)
        (remote,) = msg.ints
        if not domid_ok(remote):
            raise EventChannelError(f"evtchn.bad_domid: {remote} is not a domain id")
        page = ChannelPage(create_page_fd())
        try:
            p = self._alloc_port(client, PortState.UNBOUND, remote, page, 0)
        except BaseException:
            page.close()
            raise
        return self._link(p)

    def op_bind_interdomain(self, client: EventClient, msg: Message, fds: list[int]) -> Reply:
        need_ints(msg, 2)
        remote, rport = msg.ints
        rp = self._ports.get(remote, {}).get(rport)
        if rp is None:
            raise EventChannelError(f"evtchn.unknown_port: domain {remote} has no port {rport}")
        if rp.state is not PortState.UNBOUND or rp.remote_domid != client.domid:
            raise EventChannelError(
                f"evtchn.not_offered: port {rport} of domain {remote} is not an unbound port "
                f"offered to domain {client.domid}"
            )
        end = 1 - rp.end
        doorbell = rp.owner.doorbell_for_a_peer()  # before anything changes: it may fail
        try:
            lp = self._alloc_port(client, PortState.INTERDOMAIN, remote, rp.page, end)
        except BaseException:
            close_fds([doorbell])
            raise
        # Xen's evtchn_bind_interdomain() raises an event on the new local port: it starts
        # delivered, and its handle rings its own doorbell when it has recorded the port.
        rp.page.init_word(end, BOUND | MASKED | READY)
        lp.remote_port = rport
        rp.state = PortState.INTERDOMAIN
        rp.remote_domid = client.domid
        rp.remote_port = lp.port
        rp.page.set_bits(rp.end, BOUND)
        return self._link(lp, doorbell)

    def op_link(self, client: EventClient, msg: Message, fds: list[int]) -> Reply:
        need_ints(msg, 1)
        return self._link(self._own_port(client, msg.ints[0]))

    def op_unbind(self, client: EventClient, msg: Message, fds: list[int]) -> Reply:
        need_ints(msg, 1)
        self._close_port(self._own_port(client, msg.ints[0]))
        return Message(Op.OK), []

    def _close_port(self, p: _Port) -> None:
        old_page = p.page
        old_page.set_bits(p.end, CLOSED)
        keep_old_page = False
        if p.state is PortState.INTERDOMAIN:
            assert p.remote_port is not None
            rp = self._ports[p.remote_domid][p.remote_port]
            # The survivor keeps its state on a page the closer never held.
            kept = old_page.set_bits(rp.end, CLOSED) & PORT_STATE
            try:
                page = ChannelPage(create_page_fd())
            except (OSError, PlatformError):
                # Out of memory or descriptors: the survivor stays on the shared page.
                old_page.init_word(rp.end, kept)
                keep_old_page = True
            else:
                page.init_word(0, kept)
                rp.page, rp.end = page, 0
            # Xen's evtchn_close(): the remote end becomes unbound, offered back to us.
            rp.state = PortState.UNBOUND
            rp.remote_domid = p.domid
            rp.remote_port = None
        if not keep_old_page:
            old_page.close()
        del self._ports[p.domid][p.port]
        p.owner.ports.discard(p.port)

    # -- state -----------------------------------------------------------------------------

    def state(self) -> dict:
        """The ports as plain data."""
        out = []
        for table in self._ports.values():
            for p in table.values():
                word = p.page.word(p.end)
                out.append(
                    {
                        "domid": p.domid,
                        "port": p.port,
                        "state": p.state.value,
                        "remote_domid": p.remote_domid,
                        "remote_port": p.remote_port,
                        "pending": bool(word & PENDING),
                        "masked": bool(word & MASKED),
                    }
                )
        return {"ports": out}
