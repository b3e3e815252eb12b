"""Event channels on real Xen: a loopback pair inside dom0 through libxenevtchn.

Owns: proof that XenEventChannels binds, notifies, reports pending ports, masks until
unmask, wakes select() on its fd, and unbinds, against the Linux evtchn driver.
"""

from __future__ import annotations

import select
import time

import pytest

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
