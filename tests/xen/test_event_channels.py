"""Event channels on real Xen: a loopback pair inside dom0 through libxenevtchn.

Owns: proof that XenEventChannels binds, notifies, reports pending ports, masks until
unmask, wakes select() on its fd, and unbinds, against the Linux evtchn driver; and that its
direct link (EventChannels.direct_link, kind "xenevtchn") lets the compiled loop's
xt_evt_take / xt_evt_notify (blkback_ringloop.c) take, unmask and send events through
libxenevtchn itself, offered only for a handle's only port, with every failure left to the
Python handle.
"""

from __future__ import annotations

import select
import time

import pytest

from xentools.devices.blkback_ringloop import WAIT_EVTCHN, compiled, evt_of
from xentools.platform.interface import EventChannelError

DOM0 = 0


def wait_pending(channels, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        port = channels.pending()
        if port is not None:
            return port
        left = deadline - time.monotonic()
        assert left > 0, "no event within the timeout"
        select.select([channels.fileno()], [], [], left)


def test_loopback_notify_pending_unmask(evtchn):
    local = evtchn.bind_unbound(DOM0)
    peer = evtchn.bind_interdomain(DOM0, local)
    assert local != peer and {local, peer} <= evtchn.ports
    # Xen's EVTCHNOP_bind_interdomain sets the newly bound local port pending once, since
    # notifications sent to the unbound port before the bind would otherwise be lost.
    assert wait_pending(evtchn) == peer
    assert evtchn.pending() is None
    evtchn.unmask(peer)

    evtchn.notify(peer)
    readable, _, _ = select.select([evtchn.fileno()], [], [], 10.0)
    assert readable, "fd did not become readable after notify"
    assert wait_pending(evtchn) == local
    assert evtchn.pending() is None  # reported once

    # Masked until unmask: a second notify is not reported yet ...
    evtchn.notify(peer)
    time.sleep(0.2)
    assert evtchn.pending() is None
    # ... and arrives once unmasked (Xen re-raises what was set while masked).
    evtchn.unmask(local)
    assert wait_pending(evtchn) == local
    evtchn.unmask(local)

    # The other direction.
    evtchn.notify(local)
    assert wait_pending(evtchn) == peer
    evtchn.unmask(peer)


def test_two_handles_see_only_their_own_ports(platform):
    a = platform.open_evtchn()
    b = platform.open_evtchn()
    try:
        port_a = a.bind_unbound(DOM0)
        port_b = b.bind_interdomain(DOM0, port_a)
        assert wait_pending(b) == port_b  # set pending by the bind itself (see above)
        b.unmask(port_b)
        assert a.pending() is None
        b.notify(port_b)
        assert wait_pending(a) == port_a
        assert b.pending() is None
        a.unmask(port_a)
        a.notify(port_a)
        assert wait_pending(b) == port_b
        b.unmask(port_b)
    finally:
        a.close()
        b.close()


def test_unbound_port_errors(evtchn):
    port = evtchn.bind_unbound(DOM0)
    evtchn.unbind(port)
    assert port not in evtchn.ports
    with pytest.raises(EventChannelError) as info:
        evtchn.notify(port)
    assert info.value.errno != 0 and "xenevtchn_notify" in str(info.value)
    with pytest.raises(EventChannelError):
        evtchn.bind_interdomain(DOM0, port)


def test_close_then_use_is_refused(platform):
    channels = platform.open_evtchn()
    channels.bind_unbound(DOM0)
    channels.close()
    assert channels.ports == frozenset()
    with pytest.raises(EventChannelError, match="closed"):
        channels.fileno()


def readable(channels, timeout: float = 10.0) -> bool:
    return bool(select.select([channels.fileno()], [], [], timeout)[0])


def test_the_compiled_loop_takes_unmasks_and_notifies_through_the_direct_link(platform):
    module = compiled()
    assert module is not None, "the compiled ring loop is built for the nested suite"
    ffi, lib = module.ffi, module.lib
    a = platform.open_evtchn()
    b = platform.open_evtchn()
    try:
        port_a = a.bind_unbound(DOM0)
        assert a.direct_link(port_a).kind == "xenevtchn"  # its only port, though unbound yet
        before = b.links_changed
        port_b = b.bind_interdomain(DOM0, port_a)
        assert b.links_changed != before
        link = b.direct_link(port_b)
        assert link is not None and link.kind == "xenevtchn" and link.port == port_b
        assert link.fd == b.fileno() and link.generation == b.links_changed
        evt = evt_of(ffi, link, (-1, -1), None)
        flags = ffi.new("uint32_t *")

        # The bind's own event (see above), taken and unmasked in C; then nothing.
        assert readable(b)
        assert lib.xt_evt_take(evt, flags) == 1 and flags[0] == 0
        assert lib.xt_evt_take(evt, flags) == 0 and b.pending() is None
        # Unmasked: every notify of the peer arrives, one after the other.
        for _ in range(3):
            a.notify(port_a)
            assert readable(b), "an event after the compiled unmask did not arrive"
            assert lib.xt_evt_take(evt, flags) == 1 and flags[0] == 0
        # The compiled notify reaches the peer.
        assert lib.xt_evt_notify(evt) == 0
        assert wait_pending(a) == port_a
        a.unmask(port_a)
        assert (evt.events, evt.notifies) == (4, 1)
        assert evt.own_word[0] == 0 and evt.peer_word[0] == 0  # the always-0 field: no word to watch

        # A second port on the handle: no link for either (whose would a pending event be?).
        port_a2 = a.bind_unbound(DOM0)
        port_b2 = b.bind_interdomain(DOM0, port_a2)  # raised at once by the bind
        assert b.direct_link(port_b) is None and b.direct_link(port_b2) is None
        # A loop still holding the old link takes the other port's event: Python's, left masked.
        assert readable(b)
        flags[0] = 0
        assert lib.xt_evt_take(evt, flags) == -1 and flags[0] == WAIT_EVTCHN and evt.foreign == port_b2
        b.unmask(port_b2)  # what blkback_queue does with CompiledRing.take_foreign()
        b.unbind(port_b2)
        link2 = b.direct_link(port_b)
        assert link2 is not None and link2.generation > link.generation

        # Failures are Python's: with the stale link's port unbound, the notify fails, and the
        # Python handle's redone notify says why.
        b.unbind(port_b)
        assert lib.xt_evt_notify(evt) == -1 and evt.notifies == 1
        with pytest.raises(EventChannelError):
            b.notify(port_b)
        b.close()
        assert b.links_changed > link2.generation and b.direct_link(port_b) is None  # close moves it too
    finally:
        b.close()
        a.close()


def test_a_handle_with_two_ports_offers_no_direct_link(evtchn):
    local = evtchn.bind_unbound(DOM0)
    peer = evtchn.bind_interdomain(DOM0, local)
    assert evtchn.direct_link(local) is None and evtchn.direct_link(peer) is None
    evtchn.unbind(local)
    assert evtchn.direct_link(peer) is not None and evtchn.direct_link(local) is None
