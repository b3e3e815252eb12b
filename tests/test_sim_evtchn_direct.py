"""Event channels off the daemon: notifications travel directly between the two processes.

Checks that a bound channel keeps working while grantd is stopped (SIGSTOP), that no wakeup
is lost under a storm of notifies from another process (with the machine compare-and-swap
and with the lock used where there is none), the channel word transitions one by one, that a
survivor keeps its pending and masked bits when its peer closes (Xen's evtchn_close()), that
a peer scribbling on the channel page hurts only that channel, that junk a peer writes to a
doorbell is drained at once and loses no event, that a receiver making its
doorbell blocking and full cannot block its notifier, and that grantd refuses an evtchn
handle whose doorbell is not the write end of a pipe.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from test_sim_evtchn import connect_pair, path, readable  # noqa: F401  (path is a fixture)

from xentools.platform.interface import PlatformError
from xentools.platform.sim import evtchn_channel
from xentools.platform.sim.evtchn import SoftwareEventChannels
from xentools.platform.sim.evtchn_channel import (
    BOUND,
    CLOSED,
    DELIVERED,
    GONE,
    MASKED,
    NOTHING,
    PENDING,
    READY,
    ChannelPage,
    create_page_fd,
)
from xentools.platform.sim.grantd import query_state
from xentools.platform.sim.grantd_wire import Kind, ServiceConnection

XEN_DOMAINS = (0, 1, 2)  # the software Xen of the fresh_xen fixture (tests/conftest.py)


@pytest.fixture(params=["cmpxchg", "lock"])
def atomics(request, monkeypatch):
    """Run with the machine compare-and-swap, then with the POSIX-lock fallback."""
    if request.param == "lock":
        monkeypatch.setattr(evtchn_channel, "_cas", None)
    else:
        assert evtchn_channel.machine_cas() is not None, "the x86-64 CI machines have cmpxchg"
    return request.param


def test_channel_word_transitions(atomics):
    page = ChannelPage(create_page_fd())
    try:
        page.init_word(0, BOUND)
        assert page.raise_event(0) == DELIVERED  # delivery masks the port
        assert page.word(0) == BOUND | MASKED | READY
        assert page.raise_event(0) == NOTHING  # masked: pending only
        assert page.raise_event(0) == NOTHING  # a pending bit, not a counter
        assert page.word(0) == BOUND | MASKED | READY | PENDING
        assert page.take(0) == DELIVERED and page.take(0) == NOTHING
        assert page.unmask(0) == DELIVERED  # the pending event is delivered again
        assert page.word(0) == BOUND | MASKED | READY
        assert page.take(0) == DELIVERED
        assert page.unmask(0) == NOTHING and page.word(0) == BOUND
        assert page.unmask(0) == NOTHING  # unmasking an unmasked port does nothing
        assert page.set_bits(0, CLOSED) == BOUND
        for op in (page.raise_event, page.take, page.unmask):
            assert op(0) == GONE
        assert page.word(1) == 0  # the other end's word is untouched
    finally:
        page.close()


def test_channel_page_cannot_be_shrunk_by_a_holder():
    fd = create_page_fd()
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # F_SEAL_SHRINK: nobody can SIGBUS the other mappers
    finally:
        os.close(fd)


def test_bound_channel_works_while_grantd_is_stopped(fresh_xen):
    back = fresh_xen.platform(0).open_evtchn()
    front = fresh_xen.platform(1).open_evtchn()
    offered = back.bind_unbound(1)
    bound = front.bind_interdomain(0, offered)
    assert readable(front, 5) and front.pending() == bound
    front.unmask(bound)
    back.notify(offered)  # the first notify asks grantd for the peer's doorbell
    assert readable(front, 5) and front.pending() == bound
    front.unmask(bound)
    grantd = fresh_xen.service_pids["grantd"]
    os.kill(grantd, signal.SIGSTOP)
    try:
        for _ in range(100):
            back.notify(offered)
            assert readable(front, 5) and front.pending() == bound
            front.unmask(bound)
            front.notify(bound)
            assert readable(back, 5) and back.pending() == offered
            back.unmask(offered)
    finally:
        os.kill(grantd, signal.SIGCONT)
    back.close()
    front.close()


PRODUCER = textwrap.dedent(r"""
    import mmap, os, sys
    from xentools.platform.sim import evtchn_channel
    from xentools.platform.sim.platform import SoftwarePlatform
    root, counter_path, remote_port, count, atomics = sys.argv[1:]
    if atomics == "lock":
        evtchn_channel._cas = None
    evtchn = SoftwarePlatform(root, 2).open_evtchn()
    port = evtchn.bind_interdomain(0, int(remote_port))
    with open(counter_path, "r+b") as f:
        cells = memoryview(mmap.mmap(f.fileno(), 4096)).cast("I")
    for i in range(1, int(count) + 1):
        cells[0] = i  # the "ring": written before the notify, as a producer index is
        evtchn.notify(port)
    cells.release()
    evtchn.close()
""")


def test_no_wakeup_is_lost_under_a_notify_storm(fresh_xen, tmp_path, atomics):
    count = 3000
    counter = tmp_path / "counter"
    counter.write_bytes(bytes(4096))
    consumer = fresh_xen.platform(0).open_evtchn()
    port = consumer.bind_unbound(2)
    with open(counter, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 4096)
    cells = memoryview(mapped).cast("I")
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, fresh_xen.root_dir, str(counter), str(port), str(count), atomics]
    )
    try:
        deliveries = 0
        seen = 0
        while seen < count:
            # Every wait must end with an event: a lost wakeup would time out here.
            assert select.select([consumer], [], [], 20)[0], f"no event with {seen}/{count} seen"
            got = consumer.pending()
            if got is None:
                continue
            assert got == port
            deliveries += 1
            consumer.unmask(got)
            seen = cells[0]  # read after unmask: a notify after this is delivered again
        assert producer.wait(timeout=30) == 0
        assert 1 <= deliveries <= count
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
        cells.release()
        mapped.close()
        consumer.close()


def test_survivor_keeps_pending_and_mask_when_its_peer_closes(path):  # noqa: F811
    back, offered, front, bound = connect_pair(path)
    back.notify(offered)
    assert readable(front, 5) and front.pending() == bound  # delivered: masked now
    back.notify(offered)  # pending while masked
    back.close()
    (left,) = query_state(path)["ports"]
    assert (left["port"], left["state"], left["pending"], left["masked"]) == (
        bound, "unbound", True, True
    )
    assert not readable(front, 0.2)
    front.unmask(bound)  # Xen delivers the pending event on unmask, peer gone or not
    assert readable(front, 5) and front.pending() == bound
    front.close()


def test_a_peer_scribbling_on_the_channel_page_hurts_only_that_channel(path):  # noqa: F811
    back, offered, front, bound = connect_pair(path)
    back.notify(offered)
    assert readable(front, 5) and front.pending() == bound
    front.unmask(bound)
    # The frontend holds the channel page: it writes junk into the backend's word.
    link = front._links[bound]
    link.page.init_word(link.peer_end, CLOSED | MASKED | PENDING)
    back.notify(offered)  # returns (dropped): neither hangs nor raises
    back.unmask(offered)
    assert back.pending() is None
    # Another domain's channel with the same backend handle is untouched.
    other = SoftwareEventChannels(path, 2)
    offered2 = back.bind_unbound(2)
    bound2 = other.bind_interdomain(0, offered2)
    assert readable(other, 5) and other.pending() == bound2
    other.unmask(bound2)
    back.notify(offered2)
    assert readable(other, 5) and other.pending() == bound2
    # When the scribbler goes, the backend's port moves to a clean page and works again.
    front.close()
    again = SoftwareEventChannels(path, 1)
    rebound = again.bind_interdomain(0, offered)
    assert readable(again, 5) and again.pending() == rebound
    again.unmask(rebound)
    back.notify(offered)
    assert readable(again, 5) and again.pending() == rebound
    for h in (back, other, again):
        h.close()
    assert query_state(path)["ports"] == []


def test_junk_rung_by_a_peer_costs_one_pass_and_loses_no_event(path):  # noqa: F811
    back, offered, front, bound = connect_pair(path)
    back.notify(offered)  # the backend learns the doorbell
    assert readable(front, 5) and front.pending() == bound
    # The backend holds a write end of the frontend's doorbell: it rings with junk.
    os.write(back._links[offered].peer_doorbell, bytes(10000))
    assert readable(front, 5)
    assert front.pending() is None  # nothing was delivered...
    assert not readable(front, 0.1)  # ...and the junk is gone in one call
    front.unmask(bound)
    # A delivery racing with junk keeps its ring: junk, then a real event, then junk.
    os.write(back._links[offered].peer_doorbell, bytes(100))
    back.notify(offered)
    os.write(back._links[offered].peer_doorbell, bytes(100))
    got = []
    while readable(front, 0.5):
        got.append(front.pending())
    assert [p for p in got if p is not None] == [bound]
    back.close()
    front.close()


def test_an_evtchn_handle_must_bring_a_pipe_write_end(path):  # noqa: F811
    r, w = os.pipe()
    efd = os.eventfd(0)
    try:
        for wrong in (r, efd):  # a read end, an eventfd
            with pytest.raises(PlatformError, match=r"grantd\.connection"):
                ServiceConnection(path, Kind.EVTCHN, 0, fds=[wrong])
    finally:
        for fd in (r, w, efd):
            os.close(fd)
    h = SoftwareEventChannels(path, 0)  # the service keeps serving the others
    assert h.bind_unbound(1) == 1
    h.close()


def test_a_receiver_blocking_its_doorbell_cannot_block_the_notifier(path):  # noqa: F811
    back, offered, front, bound = connect_pair(path)
    back.notify(offered)  # the backend learns the doorbell
    assert readable(front, 5) and front.pending() == bound
    front.unmask(bound)
    # The frontend fills its own doorbell pipe and makes its own write end blocking.
    own = front._ring_own
    try:
        while True:
            os.write(own, bytes(4096))
    except BlockingIOError:
        pass
    fcntl.fcntl(own, fcntl.F_SETFL, fcntl.fcntl(own, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    done = threading.Event()

    def notify() -> None:
        back.notify(offered)
        done.set()

    worker = threading.Thread(target=notify, daemon=True)
    worker.start()
    assert done.wait(10), "notify blocked on the peer's full doorbell"
    worker.join()
    # The delivery was made (the word says ready) and the full pipe keeps the frontend awake.
    assert readable(front, 5) and front.pending() == bound
    back.close()
    front.close()


def test_a_direct_link_is_of_kind_words_for_a_handles_only_bound_port(fresh_xen):
    back = fresh_xen.platform(0).open_evtchn()
    front = fresh_xen.platform(1).open_evtchn()
    try:
        offered = back.bind_unbound(1)
        bound = front.bind_interdomain(0, offered)
        link = front.direct_link(bound)
        assert link is not None and link.kind == "words" and link.generation == front.links_changed
        other = front.bind_unbound(2)  # a second port on the handle: no link (whose event is pending?)
        assert front.direct_link(bound) is None and front.direct_link(other) is None
    finally:
        back.close()
        front.close()
