"""Event channels on the software Xen: grantd's port tables and SoftwareEventChannels.

Checks Xen's delivery rules (pending set on notify, masked on delivery, a notify while masked
delivered again on unmask), the handle's fd (readable exactly while pending() has a port),
errors for ports never bound, and what a closed or killed peer leaves behind.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time

import pytest
from support import GRANTD_SOCKET

from xentools.platform.interface import EventChannelError, PlatformError
from xentools.platform.sim.evtchn import SoftwareEventChannels
from xentools.platform.sim.grantd import query_state

PEER = r"""
import json, os, select, sys
from xentools.platform.sim.evtchn import SoftwareEventChannels
evtchn = SoftwareEventChannels(os.path.join(sys.argv[1], "grantd.sock"), int(sys.argv[2]))
def handle(c):
    op = c["op"]
    if op == "bind_unbound":
        return {"port": evtchn.bind_unbound(c["remote"])}
    if op == "bind_interdomain":
        return {"port": evtchn.bind_interdomain(c["remote"], c["port"])}
    if op == "notify":
        evtchn.notify(c["port"])
        return {}
    if op == "unmask":
        evtchn.unmask(c["port"])
        return {}
    if op == "wait":
        r, _, _ = select.select([evtchn], [], [], c["timeout"])
        return {"port": evtchn.pending() if r else None}
    if op == "echo":
        # Answer every event on `port` with a notify, `count` times.
        for _ in range(c["count"]):
            select.select([evtchn], [], [], 10)
            p = evtchn.pending()
            evtchn.unmask(p)
            evtchn.notify(p)
        return {}
    raise ValueError(op)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    try:
        out = handle(json.loads(line))
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(out), flush=True)
"""


@pytest.fixture
def path(grantd):
    """grantd's socket (the grantd and peers fixtures: tests/conftest.py)."""
    return os.path.join(grantd[0], GRANTD_SOCKET)


def readable(handle: SoftwareEventChannels, timeout: float = 0.0) -> bool:
    return bool(select.select([handle], [], [], timeout)[0])


def connect_pair(path: str) -> tuple[SoftwareEventChannels, int, SoftwareEventChannels, int]:
    """dom0 offers a port to dom1, dom1 binds it; both handles start with nothing pending."""
    back = SoftwareEventChannels(path, 0)
    front = SoftwareEventChannels(path, 1)
    offered = back.bind_unbound(1)
    bound = front.bind_interdomain(0, offered)
    # Xen's evtchn_bind_interdomain() raises an event on the new local port.
    assert readable(front, 5) and front.pending() == bound
    front.unmask(bound)
    return back, offered, front, bound


def test_events_both_ways_between_processes(path, peers):
    peer = peers(2)
    local = SoftwareEventChannels(path, 0)
    remote_port = peer.call(op="bind_unbound", remote=0)["port"]
    port = local.bind_interdomain(2, remote_port)
    assert readable(local, 5) and local.pending() == port
    local.unmask(port)
    for _ in range(3):
        local.notify(port)
        assert peer.call(op="wait", timeout=5)["port"] == remote_port
        peer.call(op="unmask", port=remote_port)
        peer.call(op="notify", port=remote_port)
        assert readable(local, 5)
        assert local.pending() == port
        local.unmask(port)
    # A burst of round trips: nothing is lost or duplicated.
    assert peer.proc.stdin is not None
    peer.proc.stdin.write(json.dumps({"op": "echo", "count": 50}) + "\n")
    peer.proc.stdin.flush()
    for _ in range(50):
        local.notify(port)
        assert readable(local, 10)
        assert local.pending() == port
        assert local.pending() is None
        local.unmask(port)
    assert peer._line() == {}
    local.close()


def test_masked_port_keeps_one_pending_event_until_unmask(path):
    back, offered, front, bound = connect_pair(path)
    back.notify(offered)
    assert readable(front, 5)
    assert front.pending() == bound
    assert not readable(front)  # the fd is readable exactly while a port waits
    assert front.pending() is None
    # Masked now: notifies set the pending bit and are not delivered...
    for _ in range(3):
        back.notify(offered)
    state = query_state(path)
    (port,) = [p for p in state["ports"] if p["domid"] == 1]
    assert port["pending"] and port["masked"]
    assert not readable(front, 0.2)
    # ...until unmask, which delivers them once (a pending bit, not a counter).
    front.unmask(bound)
    assert readable(front, 5)
    assert front.pending() == bound
    assert not readable(front, 0.2)
    # Unmask with nothing pending delivers nothing.
    front.unmask(bound)
    assert not readable(front, 0.2)
    back.notify(offered)
    assert readable(front, 5) and front.pending() == bound
    back.close()
    front.close()


def test_several_ports_on_one_handle(path):
    back = SoftwareEventChannels(path, 0)
    front = SoftwareEventChannels(path, 1)
    offered = [back.bind_unbound(1) for _ in range(3)]
    assert offered == [1, 2, 3]  # Xen hands out the lowest free port
    bound = [front.bind_interdomain(0, p) for p in offered]

    def take(n: int) -> set[int]:
        got = []
        for _ in range(n):
            assert readable(front, 5)
            got.append(front.pending())
        assert not readable(front, 0.1) and front.pending() is None
        assert len(set(got)) == n
        return set(got)

    assert take(3) == set(bound)
    for p in bound:
        front.unmask(p)
    back.notify(offered[2])
    back.notify(offered[0])
    assert take(2) == {bound[2], bound[0]}
    back.unbind(offered[1])
    assert back.bind_unbound(1) == offered[1]  # freed port is reused first
    back.close()
    front.close()


def test_never_bound_ports_raise_and_the_service_keeps_serving(path):
    h = SoftwareEventChannels(path, 0)
    other = SoftwareEventChannels(path, 5)
    for call in (h.notify, h.unmask, h.unbind):
        with pytest.raises(EventChannelError, match=r"evtchn\.unbound_port: port 7 is not bound"):
            call(7)
    with pytest.raises(EventChannelError, match=r"evtchn\.unknown_port: domain 5 has no port 1"):
        h.bind_interdomain(5, 1)
    offered_to_3 = other.bind_unbound(3)
    with pytest.raises(EventChannelError, match=r"evtchn\.not_offered"):
        h.bind_interdomain(5, offered_to_3)
    offered = other.bind_unbound(0)
    h.bind_interdomain(5, offered)
    with pytest.raises(EventChannelError, match=r"evtchn\.not_offered"):
        h.bind_interdomain(5, offered)  # already bound: not unbound any more
    with pytest.raises(EventChannelError, match=r"evtchn\.bad_domid"):
        h.bind_unbound(0x7FF0)
    # Another domain's port is not ours to notify, even if the number exists here.
    with pytest.raises(EventChannelError, match=r"evtchn\.unbound_port"):
        other.notify(99)
    # Still serving.
    third = SoftwareEventChannels(path, 6)
    assert third.bind_unbound(0) == 1
    for x in (h, other, third):
        x.close()


def test_unbind_leaves_the_peer_unbound_and_drops_its_notifies(path):
    back, offered, front, bound = connect_pair(path)
    front.unbind(bound)
    state = query_state(path)
    (left,) = state["ports"]
    assert (left["domid"], left["port"], left["state"], left["remote_domid"]) == (0, offered, "unbound", 1)
    back.notify(offered)  # dropped, as Xen's evtchn_send() drops it on an unbound port
    assert not readable(front, 0.2)
    # The freed end is offered back to the closer's domain, which can bind it again.
    again = front.bind_interdomain(0, offered)
    assert readable(front, 5) and front.pending() == again
    front.unmask(again)
    back.notify(offered)
    assert readable(front, 5) and front.pending() == again
    back.close()
    front.close()
    assert query_state(path)["ports"] == []


def test_killed_client_releases_its_ports(path, peers):
    peer = peers(3)
    local = SoftwareEventChannels(path, 0)
    offered = local.bind_unbound(3)
    peer_port = peer.call(op="bind_interdomain", remote=0, port=offered)["port"]
    peer.call(op="bind_unbound", remote=0)
    assert len(query_state(path)["ports"]) == 3
    peer.proc.send_signal(signal.SIGKILL)
    peer.proc.wait()
    deadline = time.monotonic() + 10
    while len(query_state(path)["ports"]) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (left,) = query_state(path)["ports"]
    assert (left["port"], left["state"], left["remote_domid"]) == (offered, "unbound", 3)
    assert peer_port == 1
    local.notify(offered)  # the peer is gone: dropped, not an error
    local.close()
    assert query_state(path) == {"grants": [], "maps": [], "ports": [], "clients": []}


def test_close_unbinds_everything_and_the_handle_refuses_use(path):
    back, offered, front, bound = connect_pair(path)
    front.close()
    front.close()  # idempotent
    (left,) = query_state(path)["ports"]
    assert left["state"] == "unbound"
    with pytest.raises(EventChannelError, match=r"evtchn\.closed"):
        front.notify(bound)
    with pytest.raises(EventChannelError, match=r"evtchn\.closed"):
        front.fileno()
    back.close()
    assert query_state(path)["ports"] == []


def test_a_port_bound_to_our_own_domain_works(path):
    h = SoftwareEventChannels(path, 4)
    a = h.bind_unbound(4)
    b = h.bind_interdomain(4, a)
    assert readable(h, 5) and h.pending() == b
    h.unmask(b)
    h.notify(a)
    assert readable(h, 5) and h.pending() == b
    h.notify(b)
    assert readable(h, 5) and h.pending() == a
    h.close()


def test_no_service_is_a_platform_error(tmp_path):
    with pytest.raises(PlatformError, match=r"grantd\.connection: cannot connect"):
        SoftwareEventChannels(str(tmp_path / "nothing.sock"), 0)
