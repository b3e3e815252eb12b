"""Grant sharing and mapping on the software Xen: grantd, SoftwareGrantSharer/Mapper.

Peers run as separate processes (small scripts driven over stdin/stdout) so memory really
crosses process boundaries, and so a peer can be killed or crash on a read-only page.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xentools.platform.interface import PAGE_SIZE, GrantError, GrantStillMapped, PlatformError
from xentools.platform.sim.grantd import Message, Op, query_state
from xentools.platform.sim.grantd_wire import Kind, ServiceConnection
from xentools.platform.sim.grants import (
    GrantCopy,
    SoftwareGrantMapper,
    SoftwareGrantSharer,
    coalesce_runs,
)
from xentools.platform.sim.platform import SoftwarePlatform

PEER = r"""
import ctypes, json, select, sys
from xentools.platform.sim.platform import SoftwarePlatform
root, domid = sys.argv[1], int(sys.argv[2])
plat = SoftwarePlatform(root, domid)
gntshr, gnttab, evtchn = plat.open_gntshr(), plat.open_gnttab(), plat.open_evtchn()
objs = {}
def handle(c):
    op = c["op"]
    if op == "share":
        p = gntshr.share(c["domid"], c["count"], c.get("writable", True))
        objs[id(p)] = p
        return {"id": id(p), "refs": list(p.refs)}
    if op == "map":
        m = gnttab.map(c["domid"], c["refs"], c["writable"])
        objs[id(m)] = m
        return {"id": id(m)}
    if op == "write":
        b = objs[c["id"]].buf
        data = bytes.fromhex(c["hex"])
        b[c["offset"]:c["offset"] + len(data)] = data
        return {}
    if op == "read":
        b = objs[c["id"]].buf
        return {"hex": bytes(b[c["offset"]:c["offset"] + c["length"]]).hex()}
    if op == "raw_write":
        ctypes.memmove(objs[c["id"]].address, b"X", 1)
        return {}
    if op == "unshare":
        gntshr.unshare(objs.pop(c["id"]))
        return {}
    if op == "unmap":
        gnttab.unmap(objs.pop(c["id"]))
        return {}
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
    raise ValueError(op)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    try:
        out = handle(json.loads(line))
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(out), flush=True)
"""


def wait_state(path: str, predicate, timeout: float = 10.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        state = query_state(path)
        if predicate(state):
            return state
        assert time.monotonic() < deadline, f"state never matched: {state}"
        time.sleep(0.02)


@pytest.fixture
def root(grantd):
    return grantd[0]


def sock_of(root: str) -> str:
    return os.path.join(root, "grantd.sock")


# ---------------------------------------------------------------------------------------------


def test_page_and_events_between_processes(root, peers):
    peer = peers(1)
    dom0 = SoftwarePlatform(root, 0)
    gnttab, gntshr, evtchn = dom0.open_gnttab(), dom0.open_gntshr(), dom0.open_evtchn()

    # Domain 1 grants a page to us and writes into it; we see it, answer, and it sees that.
    shared = peer.call(op="share", domid=0, count=1)
    peer.call(op="write", id=shared["id"], offset=100, hex=b"ping from 1".hex())
    mapped = gnttab.map(1, shared["refs"], writable=True)
    assert bytes(mapped.buf[100:111]) == b"ping from 1"
    mapped.buf[200:209] = b"pong to 1"
    assert peer.call(op="read", id=shared["id"], offset=200, length=9)["hex"] == b"pong to 1".hex()

    # The other direction: we grant, domain 1 maps.
    ours = gntshr.share(1, 2)
    ours.buf[PAGE_SIZE : PAGE_SIZE + 4] = b"dom0"
    theirs = peer.call(op="map", domid=0, refs=list(ours.refs), writable=True)
    assert peer.call(op="read", id=theirs["id"], offset=PAGE_SIZE, length=4)["hex"] == b"dom0".hex()
    peer.call(op="write", id=theirs["id"], offset=0, hex=b"dom1".hex())
    assert bytes(ours.buf[:4]) == b"dom1"

    # Events both ways over one interdomain channel.
    remote = peer.call(op="bind_unbound", remote=0)["port"]
    local = evtchn.bind_interdomain(1, remote)
    # Xen raises an event on the port bind_interdomain creates (evtchn_bind_interdomain()).
    assert select.select([evtchn], [], [], 5)[0] and evtchn.pending() == local
    evtchn.unmask(local)
    evtchn.notify(local)
    assert peer.call(op="wait", timeout=5)["port"] == remote
    peer.call(op="unmask", port=remote)
    peer.call(op="notify", port=remote)
    assert select.select([evtchn], [], [], 5)[0]
    assert evtchn.pending() == local
    assert evtchn.pending() is None

    peer.call(op="unmap", id=theirs["id"])
    gntshr.unshare(ours)
    gnttab.unmap(mapped)
    peer.call(op="unshare", id=shared["id"])
    for h in (gnttab, gntshr, evtchn):
        h.close()


def test_read_only_grant_refuses_writes_in_process(root):
    sharer = SoftwareGrantSharer(sock_of(root), 3)
    mapper = SoftwareGrantMapper(sock_of(root), 0)
    pages = sharer.share(0, 2, writable=False)
    pages.buf[:5] = b"hello"  # the granter always writes its own pages
    with pytest.raises(GrantError, match=r"grant\.readonly"):
        mapper.map(3, pages.refs, writable=True)
    mapped = mapper.map(3, pages.refs, writable=False)
    assert mapped.buf.readonly
    assert bytes(mapped.buf[:5]) == b"hello"
    with pytest.raises(TypeError):
        mapped.buf[0] = 1
    mapper.unmap(mapped)
    sharer.unshare(pages)
    mapper.close()
    sharer.close()


def test_raw_write_to_read_only_mapping_kills_the_writer(root, peers):
    sharer = SoftwareGrantSharer(sock_of(root), 0)
    pages = sharer.share(2, 1, writable=False)
    pages.buf[:4] = b"safe"
    peer = peers(2)
    m = peer.call(op="map", domid=0, refs=list(pages.refs), writable=False)
    assert peer.call(op="read", id=m["id"], offset=0, length=4)["hex"] == b"safe".hex()
    assert peer.call_error(op="write", id=m["id"], offset=0, hex="00")["error"] == "TypeError"
    peer.send(op="raw_write", id=m["id"])
    assert peer.proc.wait(timeout=20) == -signal.SIGSEGV
    assert bytes(pages.buf[:4]) == b"safe"
    # The crashed mapper's map is counted down, so the grant can be revoked.
    wait_state(sock_of(root), lambda s: not s["maps"])
    assert sharer.is_mapped(pages) is False
    sharer.unshare(pages)
    sharer.close()


def test_unmap_and_unshare_leave_nothing(root):
    path = sock_of(root)
    sharer = SoftwareGrantSharer(path, 4)
    mapper = SoftwareGrantMapper(path, 0)
    a = sharer.share(0, 3)
    b = sharer.share(0, 1, writable=False)
    state = query_state(path)
    assert sorted(g["ref"] for g in state["grants"]) == sorted(a.refs + b.refs)
    assert all(g["domid"] == 4 and g["target"] == 0 for g in state["grants"])
    assert {g["ref"]: g["writable"] for g in state["grants"]}[b.refs[0]] is False

    m = mapper.map(4, [b.refs[0], a.refs[1]], writable=False)
    assert sharer.is_mapped(a) and sharer.is_mapped(b)
    assert query_state(path)["maps"] == [
        {"domid": 0, "map_id": m.map_id, "refs": [[4, b.refs[0]], [4, a.refs[1]]]}
    ]
    mapper.unmap(m)
    assert not sharer.is_mapped(a) and not sharer.is_mapped(b)
    with pytest.raises(GrantError, match=r"grant\.unmapped"):
        m.buf  # noqa: B018
    sharer.unshare(a)
    sharer.unshare(b)
    with pytest.raises(GrantError, match=r"grant\.unshared"):
        a.buf  # noqa: B018
    state = query_state(path)
    assert state["grants"] == [] and state["maps"] == []
    mapper.close()
    sharer.close()
    assert query_state(path) == {"grants": [], "maps": [], "ports": [], "clients": []}


def test_still_mapped_grant_is_not_revoked_and_its_pages_never_reused(root):
    path = sock_of(root)
    sharer = SoftwareGrantSharer(path, 5)
    mapper = SoftwareGrantMapper(path, 0)
    pages = sharer.share(0, 2)
    m = mapper.map(5, pages.refs, writable=True)
    with pytest.raises(GrantStillMapped, match=r"grant\.still_mapped.*XSA-396") as info:
        sharer.unshare(pages)
    assert info.value.refs == pages.refs  # type: ignore[attr-defined]
    assert sharer.leaked_pages == 2
    grants = query_state(path)["grants"]
    assert {(g["ref"], g["revoking"], g["maps"]) for g in grants} == {(r, True, 1) for r in pages.refs}
    # A revoked grant cannot be mapped again, even by its rightful peer.
    with pytest.raises(GrantError, match=r"grant\.revoked"):
        mapper.map(5, pages.refs[:1], writable=False)
    # The peer keeps writing to the leaked pages; a new share must never show those bytes.
    m.buf[:] = b"\xaa" * len(m.buf)
    fresh = sharer.share(0, 4)
    assert bytes(fresh.buf) == bytes(4 * PAGE_SIZE)
    m.buf[:] = b"\xbb" * len(m.buf)
    assert bytes(fresh.buf) == bytes(4 * PAGE_SIZE)
    mapper.unmap(m)
    assert [g["ref"] for g in query_state(path)["grants"]] == list(fresh.refs)
    sharer.unshare(fresh)
    mapper.close()
    sharer.close()
    assert query_state(path)["grants"] == []


def test_reused_pages_come_back_zeroed(root):
    sharer = SoftwareGrantSharer(sock_of(root), 6)
    first = sharer.share(0, 3)
    first.buf[:] = b"\x55" * len(first.buf)
    sharer.unshare(first)
    again = sharer.share(0, 3)
    assert bytes(again.buf) == bytes(3 * PAGE_SIZE)
    sharer.close()


def test_grant_errors_are_clear_and_the_service_keeps_serving(root):
    path = sock_of(root)
    sharer = SoftwareGrantSharer(path, 7)
    mapper = SoftwareGrantMapper(path, 0)
    other = SoftwareGrantMapper(path, 2)
    pages = sharer.share(0, 1)
    ro = sharer.share(0, 1, writable=False)
    with pytest.raises(GrantError, match=r"grant\.unknown_ref: domain 7 has no grant ref 9999"):
        mapper.map(7, [9999], writable=False)
    with pytest.raises(GrantError, match=r"grant\.unknown_ref"):
        mapper.map(8, pages.refs, writable=False)  # right ref, wrong granter
    with pytest.raises(GrantError, match=r"grant\.wrong_domain: .* granted to domain 0, not to domain 2"):
        other.map(7, pages.refs, writable=False)
    with pytest.raises(GrantError, match=r"grant\.readonly"):
        mapper.map(7, [pages.refs[0], ro.refs[0]], writable=True)
    with pytest.raises(GrantError, match=r"grant\.count"):
        mapper.map(7, [], writable=False)
    with pytest.raises(GrantError, match=r"grant\.bad_ref"):
        mapper.map(7, [-1], writable=False)
    with pytest.raises(GrantError, match=r"grant\.bad_domid"):
        sharer.share(0x7FF0, 1)
    with pytest.raises(GrantError, match=r"grant\.count"):
        sharer.share(0, 0)
    # A failed map counted nothing: nothing is mapped.
    assert query_state(path)["maps"] == []
    assert not sharer.is_mapped(pages)
    # Pages of another handle are not ours to unshare.
    other_sharer = SoftwareGrantSharer(path, 7)
    with pytest.raises(GrantError, match=r"grant\.not_shared"):
        other_sharer.unshare(pages)
    # After all that, everything still works.
    m = mapper.map(7, pages.refs + ro.refs, writable=False)
    assert len(m.buf) == 2 * PAGE_SIZE
    mapper.unmap(m)
    for h in (sharer, mapper, other, other_sharer):
        h.close()
    assert query_state(path)["grants"] == []


def test_malformed_messages_drop_only_that_client(root):
    path = sock_of(root)
    sharer = SoftwareGrantSharer(path, 1)
    pages = sharer.share(0, 1)
    for garbage in (b"\x01", Message(Op.HELLO, (99, 0)).encode(), Message(Op.MAP, (1, 0, 8)).encode()):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
            raw.settimeout(5)
            raw.connect(path)
            raw.send(garbage)
            assert raw.recv(100) == b""  # grantd hangs up on a client breaking the protocol
    mapper = SoftwareGrantMapper(path, 0)
    m = mapper.map(1, pages.refs, writable=True)
    m.buf[0] = 42
    assert pages.buf[0] == 42
    mapper.close()
    sharer.close()


def test_killed_granter_revokes_its_grants_but_mappings_stay_valid(root, peers):
    path = sock_of(root)
    peer = peers(3)
    kept = peer.call(op="share", domid=0, count=2)
    dropped = peer.call(op="share", domid=0, count=1)
    peer.call(op="write", id=kept["id"], offset=PAGE_SIZE, hex=b"survives".hex())
    mapper = SoftwareGrantMapper(path, 0)
    m = mapper.map(3, kept["refs"], writable=True)
    peer.kill()
    state = wait_state(path, lambda s: len(s["grants"]) == 2)
    assert {(g["ref"], g["revoking"]) for g in state["grants"]} == {(r, True) for r in kept["refs"]}
    assert not any(g["ref"] in dropped["refs"] for g in state["grants"])
    # Our mapping is still memory: read and write it.
    assert bytes(m.buf[PAGE_SIZE : PAGE_SIZE + 8]) == b"survives"
    m.buf[:3] = b"abc"
    assert bytes(m.buf[:3]) == b"abc"
    with pytest.raises(GrantError, match=r"grant\.revoked"):
        mapper.map(3, kept["refs"], writable=False)
    with pytest.raises(GrantError, match=r"grant\.unknown_ref"):
        mapper.map(3, dropped["refs"], writable=False)
    mapper.unmap(m)
    assert query_state(path)["grants"] == []
    mapper.close()


def test_killed_mapper_counts_its_maps_down(root, peers):
    path = sock_of(root)
    sharer = SoftwareGrantSharer(path, 0)
    pages = sharer.share(4, 3)
    peer = peers(4)
    peer.call(op="map", domid=0, refs=list(pages.refs), writable=True)
    peer.call(op="map", domid=0, refs=[pages.refs[1]], writable=False)
    assert sharer.is_mapped(pages)
    peer.kill()
    wait_state(path, lambda s: not s["maps"] and all(c["domid"] != 4 for c in s["clients"]))
    assert sharer.is_mapped(pages) is False
    sharer.unshare(pages)
    sharer.close()


def test_many_refs_map_contiguously_across_non_adjacent_pages(root):
    path = sock_of(root)
    sharer = SoftwareGrantSharer(path, 9)
    mapper = SoftwareGrantMapper(path, 0)
    singles = [sharer.share(0, 1) for _ in range(6)]
    block = sharer.share(0, 4)
    ref_to_byte: dict[int, int] = {}
    for i, s in enumerate(singles):
        s.buf[:] = bytes([i + 1]) * PAGE_SIZE
        ref_to_byte[s.refs[0]] = i + 1
    for j, ref in enumerate(block.refs):
        block.buf[j * PAGE_SIZE : (j + 1) * PAGE_SIZE] = bytes([100 + j]) * PAGE_SIZE
        ref_to_byte[ref] = 100 + j
    refs = list(ref_to_byte)
    random.Random(1).shuffle(refs)
    refs += refs[:2]  # the same ref twice in one map is two views of one page
    m = mapper.map(9, refs, writable=True)
    assert len(m.buf) == len(refs) * PAGE_SIZE
    for i, ref in enumerate(refs):
        assert bytes(m.buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) == bytes([ref_to_byte[ref]]) * PAGE_SIZE
    # Writes through the contiguous mapping land in the right granted page.
    m.buf[3 * PAGE_SIZE + 7] = 0xEE
    target = refs[3]
    owner = next(s for s in [*singles, block] if target in s.refs)
    assert owner.buf[owner.refs.index(target) * PAGE_SIZE + 7] == 0xEE
    # Both views of a ref mapped twice show the same page.
    m.buf[5] = 0xDD
    assert m.buf[(len(refs) - 2) * PAGE_SIZE + 5] == 0xDD
    mapper.unmap(m)
    for s in [*singles, block]:
        sharer.unshare(s)
    mapper.close()
    sharer.close()
    assert query_state(path)["grants"] == []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(8)), writable=st.booleans())
def test_any_order_of_refs_maps_each_page_in_place(root, order, writable):
    path = sock_of(root)
    with SoftwareGrantSharer(path, 11) as sharer, SoftwareGrantMapper(path, 0) as mapper:
        a = sharer.share(0, 5)
        b = sharer.share(0, 3)
        refs = a.refs + b.refs
        for k in range(8):
            src, idx = (a, k) if k < 5 else (b, k - 5)
            src.buf[idx * PAGE_SIZE : idx * PAGE_SIZE + 2] = bytes([k, 0x5A])
        chosen = [refs[k] for k in order]
        m = mapper.map(11, chosen, writable=writable)
        assert [bytes(m.buf[i * PAGE_SIZE : i * PAGE_SIZE + 2]) for i in range(8)] == [
            bytes([k, 0x5A]) for k in order
        ]
        mapper.unmap(m)
    assert query_state(path)["grants"] == []


def test_coalesce_runs_merges_only_adjacent_pages_of_one_file():
    assert coalesce_runs([(5, 0), (5, 1), (5, 2)]) == [(5, 0, 3)]
    assert coalesce_runs([(5, 2), (5, 1)]) == [(5, 2, 1), (5, 1, 1)]
    assert coalesce_runs([(5, 0), (6, 1), (6, 2), (5, 1)]) == [(5, 0, 1), (6, 1, 2), (5, 1, 1)]
    assert coalesce_runs([]) == []


def test_grant_copy(root):
    path = sock_of(root)
    with SoftwareGrantSharer(path, 12) as sharer, SoftwareGrantMapper(path, 0) as mapper:
        rw = sharer.share(0, 1)
        ro = sharer.share(0, 1, writable=False)
        ro.buf[10:15] = b"fixed"
        out = bytearray(5)
        mapper.copy([
            GrantCopy(12, rw.refs[0], 4000, b"into grant", to_grant=True),
            GrantCopy(12, ro.refs[0], 10, out, to_grant=False),
        ])
        assert bytes(rw.buf[4000:4010]) == b"into grant"
        assert out == b"fixed"
        with pytest.raises(GrantError, match=r"grant\.readonly"):
            mapper.copy([GrantCopy(12, ro.refs[0], 0, b"x", to_grant=True)])
        with pytest.raises(GrantError, match=r"grant\.copy_bounds"):
            mapper.copy([GrantCopy(12, rw.refs[0], 4090, b"0123456789", to_grant=True)])
        with pytest.raises(GrantError, match=r"grant\.copy_readonly"):
            mapper.copy([GrantCopy(12, rw.refs[0], 0, b"immutable", to_grant=False)])
        # Nothing of a refused batch was copied.
        assert bytes(rw.buf[:10]) == bytes(10)


def test_state_query_answers_with_any_number_of_grants(root):
    # Issue 9: the STATE reply used to be one message, which broke above ~1,500 grants.
    path = sock_of(root)
    sharer = SoftwareGrantSharer(path, 3)
    mapper = SoftwareGrantMapper(path, 0)
    shared = [sharer.share(0, 4000) for _ in range(3)]
    mapped = mapper.map(3, shared[0].refs, writable=True)
    state = query_state(path)
    assert len(state["grants"]) == 12000
    assert sorted(g["ref"] for g in state["grants"]) == sorted(r for p in shared for r in p.refs)
    (only_map,) = state["maps"]
    assert len(only_map["refs"]) == 4000
    assert {"kind": "gnttab", "domid": 0} in state["clients"]
    mapper.unmap(mapped)
    mapper.close()
    sharer.close()
    assert query_state(path) == {"grants": [], "maps": [], "ports": [], "clients": []}


def test_a_writable_mapper_cannot_shrink_the_granters_memory(root):
    # A hostile peer holding the granter's memfd read-write must not be able to truncate it:
    # the granter would die with SIGBUS touching its own shared pages.
    path = sock_of(root)
    sharer = SoftwareGrantSharer(path, 3)
    pages = sharer.share(0, 2)
    raw = ServiceConnection(path, Kind.GNTTAB, 0)
    try:
        reply, fds = raw.request(Op.MAP, (3, 1, *pages.refs))
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fds[0], 0)
        finally:
            for fd in fds:
                os.close(fd)
        raw.request(Op.UNMAP, (reply.ints[0],))
    finally:
        raw.close()
    pages.buf[-1] = 7  # still our memory
    assert pages.buf[-1] == 7
    sharer.close()


def test_closing_a_sharer_revokes_everything(root):
    path = sock_of(root)
    sharer = SoftwareGrantSharer(path, 13)
    sharer.share(0, 2)
    sharer.share(1, 1)
    assert len(query_state(path)["grants"]) == 3
    sharer.close()
    sharer.close()  # idempotent
    assert query_state(path) == {"grants": [], "maps": [], "ports": [], "clients": []}
    with pytest.raises(GrantError, match=r"grant\.closed"):
        sharer.share(0, 1)


def test_handles_refuse_bad_domains_and_missing_services(root, tmp_path):
    with pytest.raises(PlatformError, match=r"grantd\.bad_domid: 32752 is not a domain id"):
        SoftwareGrantMapper(sock_of(root), 0x7FF0)
    with pytest.raises(PlatformError, match=r"grantd\.connection: cannot connect"):
        SoftwareGrantSharer(str(tmp_path / "none.sock"), 0)
    assert query_state(sock_of(root))["clients"] == []


def test_repeated_handles_and_maps_leak_no_descriptors_or_mappings(grantd):
    root, proc = grantd
    path = sock_of(root)

    def counts() -> tuple[int, int, int]:
        with open("/proc/self/maps") as maps:
            nmaps = len(maps.readlines())
        return len(os.listdir("/proc/self/fd")), nmaps, len(os.listdir(f"/proc/{proc.pid}/fd"))

    def cycle() -> None:
        with SoftwareGrantSharer(path, 1) as sharer, SoftwareGrantMapper(path, 0) as mapper:
            pages = [sharer.share(0, 1) for _ in range(4)]
            refs = [p.refs[0] for p in reversed(pages)]
            for _ in range(20):
                m = mapper.map(1, refs, writable=True)
                m.buf[-1] = 1
                mapper.unmap(m)
            for p in pages:
                sharer.unshare(p)

    def settled() -> tuple[int, int, int]:
        # grantd closes a connection when it reads the client's EOF, a moment after the
        # client's close() returned: wait until only its own three sockets are left (the
        # listener and its wake-up pair), then count.
        deadline = time.monotonic() + 10
        while True:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            sockets = 0
            for fd in fds:
                try:
                    sockets += os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith("socket:")
                except FileNotFoundError:
                    pass
            if sockets == 3 or time.monotonic() > deadline:
                return counts()
            time.sleep(0.01)

    cycle()  # warm up caches (libc, imports)
    before = settled()
    for _ in range(5):
        cycle()
    assert settled() == before
