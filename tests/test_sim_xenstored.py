"""The software xenstored against clients nobody here wrote: Xen's xenstore-* tools
(libxenstore, via XENSTORED_PATH) and pyxs; plus bad input on raw sockets, and lifecycle."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pyxs
import pytest

from xentools.core.xs_wire import FrameDecoder, Message, XsOp, encode, error_name, join_strings
from xentools.platform.interface import XenstoreError
from xentools.platform.sim.xenstore_store import Quotas
from xentools.platform.sim.xenstored import Xenstored, domain_socket_path, spawn_xenstored
from xentools.platform.xenstore import XenstoreClient


@pytest.fixture
def dom0(xenstored) -> Iterator[XenstoreClient]:
    with XenstoreClient.connect(xenstored, timeout=5.0) as client:
        yield client


def tool(xenstored: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XENSTORED_PATH=xenstored)
    proc = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=20)
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


class Raw:
    """A bare socket speaking frames, to send what no well-behaved client would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decoder = FrameDecoder()
        self.queue: list[Message] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, op: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> None:
        self.send_raw(struct.pack("<IIII", op, req_id, tx_id, len(payload)) + payload)

    def recv(self, timeout: float = 5.0) -> Message:
        deadline = time.monotonic() + timeout
        while not self.queue:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], max(left, 0))
            assert ready, "no reply from the server"
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("server closed the connection")
            self.queue += self.decoder.feed(data)
        return self.queue.pop(0)

    def call(self, op: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> Message:
        self.send(op, payload, req_id, tx_id)
        reply = self.recv()
        assert reply.req_id == req_id
        return reply

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready) and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(xenstored) -> Iterator[Raw]:
    conn = Raw(xenstored)
    yield conn
    conn.close()


def errno_of(msg: Message) -> str:
    assert msg.op == XsOp.ERROR, msg
    return error_name(msg.payload)


# -- Xen's C tools --------------------------------------------------------------------------


def test_c_tools_write_read_list_exists_rm(xenstored):
    tool(xenstored, "xenstore-write", "/vm/a", "hello", "/vm/b/c", "world")
    assert tool(xenstored, "xenstore-read", "/vm/a").stdout == "hello\n"
    assert tool(xenstored, "xenstore-read", "/vm/b/c").stdout == "world\n"
    assert tool(xenstored, "xenstore-list", "/vm").stdout.split() == ["a", "b"]
    ls = tool(xenstored, "xenstore-ls", "/vm").stdout
    assert 'a = "hello"' in ls and 'c = "world"' in ls
    assert tool(xenstored, "xenstore-exists", "/vm/b/c", check=False).returncode == 0
    assert tool(xenstored, "xenstore-exists", "/vm/nope", check=False).returncode == 1
    tool(xenstored, "xenstore-rm", "/vm/b")
    assert tool(xenstored, "xenstore-list", "/vm").stdout.split() == ["a"]
    failed = tool(xenstored, "xenstore-read", "/vm/b/c", check=False)
    assert failed.returncode == 1 and "couldn't read path" in failed.stderr


def test_c_tools_chmod_and_perms(xenstored, dom0):
    tool(xenstored, "xenstore-write", "/p/node", "x")
    tool(xenstored, "xenstore-chmod", "/p/node", "r3", "b5")
    assert dom0.get_perms("/p/node") == ["r3", "b5"]
    assert "(r3,b5)" in tool(xenstored, "xenstore-ls", "-p", "/p").stdout


def test_c_tools_watch_prints_events(xenstored, dom0):
    env = dict(os.environ, XENSTORED_PATH=xenstored)
    watcher = subprocess.Popen(
        ["xenstore-watch", "-n", "3", "/w"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline() == "/w\n"  # the initial event: the watch is set
        dom0.write("/w/x", b"1")
        dom0.write("/elsewhere", b"2")  # not below /w: no event
        dom0.write("/w/y/z", b"3")
        out, _ = watcher.communicate(timeout=10)
    finally:
        watcher.kill()
        watcher.wait()
    assert out.split() == ["/w/x", "/w/y/z"]


def test_c_tools_list_big_directory_via_directory_part(xenstored, dom0):
    names = [f"entry-{i:05d}" for i in range(700)]  # 8400 bytes of names: DIRECTORY is E2BIG
    tx = dom0.transaction_start()
    for name in names:
        dom0.write(f"/big/{name}", b"", tx)
    assert dom0.transaction_end(tx)
    with pytest.raises(XenstoreError) as exc:
        dom0._request(XsOp.DIRECTORY, b"/big\0", 0, "/big")
    assert exc.value.errno_name == "E2BIG"
    # libxenstore falls back to XS_DIRECTORY_PART and parses our generation-count format.
    assert tool(xenstored, "xenstore-list", "/big").stdout.split() == names


def test_c_tools_as_unprivileged_domain(xenstored, dom0):
    dom0.write("/secret", b"s3cr3t")
    dom0.mkdir("/local/domain/5")
    dom0.set_perms("/local/domain/5", ["n5"])
    dom0.introduce(5, 1234, 7)
    domu = domain_socket_path(xenstored, 5)
    denied = tool(domu, "xenstore-read", "/secret", check=False)
    assert denied.returncode == 1
    assert tool(domu, "xenstore-write", "/secret", "mine", check=False).returncode == 1
    assert dom0.read("/secret") == b"s3cr3t"
    tool(domu, "xenstore-write", "data/x", "from-domu")  # relative to /local/domain/5
    assert dom0.read("/local/domain/5/data/x") == b"from-domu"
    assert dom0.get_perms("/local/domain/5/data/x") == ["n5"]
    assert tool(domu, "xenstore-read", "data/x").stdout == "from-domu\n"


# -- pyxs -----------------------------------------------------------------------------------


def test_pyxs_read_write_list_perms(xenstored, dom0):
    with pyxs.Client(unix_socket_path=xenstored) as c:
        c.write(b"/py/a", b"1")
        c.mkdir(b"/py/dir")
        assert c.read(b"/py/a") == b"1"
        assert sorted(c.list(b"/py")) == [b"a", b"dir"]
        assert c.exists(b"/py/dir") and not c.exists(b"/py/none")
        c.set_perms(b"/py/a", [b"b0", b"r2"])
        assert c.get_perms(b"/py/a") == [b"b0", b"r2"]
        c.delete(b"/py/dir")
        assert c.list(b"/py") == [b"a"]
        assert c.get_domain_path(3) == b"/local/domain/3"
        with pytest.raises(pyxs.PyXSError) as exc:
            c.read(b"/py/none")
        assert exc.value.args[0] == 2  # ENOENT
    assert dom0.read("/py/a") == b"1"


def test_pyxs_transaction_commit_and_conflict(xenstored):
    with pyxs.Client(unix_socket_path=xenstored) as a, pyxs.Client(unix_socket_path=xenstored) as b:
        a.write(b"/tx/n", b"0")
        a.transaction()
        b.transaction()
        assert a.read(b"/tx/n") == b"0" and b.read(b"/tx/n") == b"0"
        a.write(b"/tx/n", b"a")
        b.write(b"/tx/n", b"b")
        assert a.commit() is True
        assert b.commit() is False  # EAGAIN: /tx/n changed under it
        assert a.read(b"/tx/n") == b"a"


def test_pyxs_monitor_watch(xenstored, dom0):
    with pyxs.Client(unix_socket_path=xenstored) as c:
        with c.monitor() as m:
            m.watch(b"/mon", b"tok")
            events = m.wait()
            assert next(events) == (b"/mon", b"tok")
            dom0.write("/mon/child", b"x")
            assert next(events) == (b"/mon/child", b"tok")


# -- transactions -------------------------------------------------------------------------


def test_racing_transactions_exactly_one_eagain(xenstored, dom0):
    with XenstoreClient.connect(xenstored, timeout=5.0) as other:
        dom0.write("/race", b"0")
        t1 = dom0.transaction_start()
        t2 = other.transaction_start()
        for client, tx in ((dom0, t1), (other, t2)):
            value = int(client.read("/race", tx))
            client.write("/race", str(value + 1), tx)
        results = [dom0.transaction_end(t1), other.transaction_end(t2)]
        assert sorted(results) == [False, True]
        assert dom0.read("/race") == b"1"


def test_transaction_isolation_abort_and_events(xenstored, dom0):
    dom0.write("/iso/base", b"b")
    dom0.watch("/iso", "w")
    assert dom0.read_watch(2.0) == ("/iso", "w")
    tx = dom0.transaction_start()
    dom0.write("/iso/new", b"n", tx)
    dom0.rm("/iso/base", tx)
    assert dom0.read("/iso/new", tx) == b"n"
    assert not dom0.exists("/iso/new")  # invisible outside until committed
    assert dom0.read("/iso/base") == b"b"
    assert dom0.read_watch(0.2) is None  # and no event yet
    assert dom0.transaction_end(tx, commit=False)
    assert not dom0.exists("/iso/new") and dom0.exists("/iso/base")
    tx = dom0.transaction_start()
    dom0.write("/iso/new", b"n", tx)
    assert dom0.transaction_end(tx)
    assert dom0.read("/iso/new") == b"n"
    assert dom0.read_watch(2.0) == ("/iso/new", "w")


def test_transaction_conflicts_on_read_only_access(xenstored, dom0):
    dom0.write("/ro/a", b"1")
    tx = dom0.transaction_start()
    dom0.read("/ro/a", tx)
    dom0.write("/ro/b", b"2", tx)
    dom0.write("/ro/a", b"changed")  # outside the transaction
    assert dom0.transaction_end(tx) is False
    assert not dom0.exists("/ro/b")


def test_unrelated_transactions_both_commit(xenstored, dom0):
    dom0.mkdir("/u/x")
    dom0.mkdir("/u/y")
    t1 = dom0.transaction_start()
    t2 = dom0.transaction_start()
    dom0.write("/u/x/v", b"1", t1)
    dom0.write("/u/y/v", b"2", t2)
    assert dom0.transaction_end(t1) and dom0.transaction_end(t2)


# -- watches --------------------------------------------------------------------------------


def test_watch_scope_and_recursive_rm(xenstored, dom0):
    dom0.write("/ws/a/deep/leaf", b"x")
    dom0.watch("/ws/a", "sub")
    dom0.watch("/ws/a/deep/leaf", "leaf")
    dom0.watch("/ws/other", "other")
    got = {dom0.read_watch(2.0) for _ in range(3)}
    assert got == {("/ws/a", "sub"), ("/ws/a/deep/leaf", "leaf"), ("/ws/other", "other")}
    dom0.write("/ws/sibling", b"y")  # outside every watch
    dom0.rm("/ws/a")
    got = set()
    while (event := dom0.read_watch(0.5)) is not None:
        got.add(event)
    # The removed root fires watches on it and above; removed descendants fire only
    # watches set exactly on them (xenstored's delnode_sub()).
    assert got == {("/ws/a", "sub"), ("/ws/a/deep/leaf", "leaf")}


def test_unwatch_and_reset_watches(xenstored, dom0):
    dom0.watch("/uw", "t")
    assert dom0.read_watch(2.0) == ("/uw", "t")
    with pytest.raises(XenstoreError) as exc:
        dom0.watch("/uw", "t")
    assert exc.value.errno_name == "EEXIST"
    dom0.unwatch("/uw", "t")
    with pytest.raises(XenstoreError) as exc:
        dom0.unwatch("/uw", "t")
    assert exc.value.errno_name == "ENOENT"
    dom0.write("/uw/x", b"1")
    dom0.watch("/uw2", "t2")
    assert dom0.read_watch(2.0) == ("/uw2", "t2")
    tx = dom0.transaction_start()
    dom0.reset_watches()
    dom0.write("/uw2/x", b"1")
    assert dom0.read_watch(0.3) is None
    with pytest.raises(XenstoreError) as exc:
        dom0.read("/uw2/x", tx)  # RESET_WATCHES also ends the transactions
    assert exc.value.errno_name == "ENOENT"


def test_introduce_release_special_watches(xenstored, dom0):
    dom0.watch("@introduceDomain", "intro")
    dom0.watch("@releaseDomain", "rel")
    assert {dom0.read_watch(2.0), dom0.read_watch(2.0)} == {
        ("@introduceDomain", "intro"),
        ("@releaseDomain", "rel"),
    }
    assert not dom0.is_introduced(9)
    dom0.introduce(9, 100, 3)
    assert dom0.read_watch(2.0) == ("@introduceDomain", "intro")
    assert dom0.is_introduced(9) and dom0.is_introduced(0)
    domu_path = domain_socket_path(xenstored, 9)
    assert os.path.exists(domu_path)
    domu = XenstoreClient.connect(domu_path, timeout=5.0)
    try:
        assert domu.get_domain_path(9) == "/local/domain/9"
        dom0.release(9)
        assert dom0.read_watch(2.0) == ("@releaseDomain", "rel")
        assert not dom0.is_introduced(9)
        assert not os.path.exists(domu_path)
        with pytest.raises(XenstoreError):  # its connection went with the domain
            domu.read("/")
    finally:
        domu.close()
    with pytest.raises(XenstoreError) as exc:
        dom0.release(9)
    assert exc.value.errno_name == "ENOENT"


# -- domains and permissions ----------------------------------------------------------------


@pytest.fixture
def domu(xenstored, dom0) -> Iterator[XenstoreClient]:
    dom0.mkdir("/local/domain/4")
    dom0.set_perms("/local/domain/4", ["n4"])
    dom0.introduce(4, 1, 1)
    with XenstoreClient.connect(domain_socket_path(xenstored, 4), timeout=5.0) as client:
        yield client


def test_domu_permissions(dom0, domu):
    dom0.write("/shared/ro", b"r")
    dom0.set_perms("/shared/ro", ["n0", "r4"])
    dom0.write("/shared/hidden/child", b"h")
    assert domu.read("/shared/ro") == b"r"
    for call in (lambda: domu.write("/shared/ro", b"x"), lambda: domu.read("/shared/hidden")):
        with pytest.raises(XenstoreError) as exc:
            call()
        assert exc.value.errno_name == "EACCES"
    # A missing node below an unreadable parent must not reveal that it is missing.
    with pytest.raises(XenstoreError) as exc:
        domu.read("/shared/hidden/nope")
    assert exc.value.errno_name == "EACCES"
    with pytest.raises(XenstoreError) as exc:
        domu.read("/local/domain/4/nope")
    assert exc.value.errno_name == "ENOENT"
    # Own tree: relative paths, owned by the domain, inheriting the parent's other entries.
    domu.write("device/vbd/51712/state", "1")
    assert dom0.read("/local/domain/4/device/vbd/51712/state") == b"1"
    assert dom0.get_perms("/local/domain/4/device/vbd/51712/state") == ["n4"]
    assert domu.directory("device/vbd") == ["51712"]
    domu.set_perms("device", ["n4", "r0", "b7"])
    with pytest.raises(XenstoreError) as exc:
        domu.set_perms("device", ["n7"])  # giving a node away
    assert exc.value.errno_name == "EPERM"
    for call in (lambda: domu.introduce(8, 1, 1), lambda: domu.release(4), lambda: domu.is_introduced(4)):
        with pytest.raises(XenstoreError) as exc:
            call()
        assert exc.value.errno_name == "EACCES"


def test_domu_watch_filtered_and_relative(dom0, domu):
    dom0.write("/local/domain/4/fe", b"")
    dom0.set_perms("/local/domain/4/fe", ["n4"])
    domu.watch("fe", "rel")
    assert domu.read_watch(2.0) == ("fe", "rel")  # relative watch: relative event paths
    dom0.write("/local/domain/4/fe/state", b"3")
    assert domu.read_watch(2.0) == ("fe/state", "rel")
    dom0.write("/private", b"")
    domu.watch("/private", "p")
    assert domu.read_watch(2.0) == ("/private", "p")  # the initial event is always sent
    dom0.write("/private/x", b"1")  # but domain 4 may not read it: no event
    assert domu.read_watch(0.3) is None


def test_set_target_grants_access(xenstored, dom0, domu):
    dom0.mkdir("/local/domain/6")
    dom0.set_perms("/local/domain/6", ["n6"])
    with pytest.raises(XenstoreError):
        domu.write("/local/domain/6/x", b"1")
    dom0._request(XsOp.SET_TARGET, join_strings(["4", "6"]), 0, "4")
    domu.write("/local/domain/6/x", b"1")
    assert dom0.read("/local/domain/6/x") == b"1"


def test_quotas(sockdir):
    path = os.path.join(sockdir, "q")
    quotas = Quotas(entries_per_domain=5, node_size=32, watches_per_connection=2, transactions_per_connection=1)
    proc = spawn_xenstored(path, quotas=quotas)
    try:
        with XenstoreClient.connect(path, timeout=5.0) as dom0:
            dom0.mkdir("/local/domain/3")
            dom0.set_perms("/local/domain/3", ["n3"])
            dom0.introduce(3, 1, 1)
            with XenstoreClient.connect(domain_socket_path(path, 3), timeout=5.0) as domu:

                def errno_name(call) -> str:
                    with pytest.raises(XenstoreError) as exc:
                        call()
                    return exc.value.errno_name

                for i in range(4):  # /local/domain/3 itself is owned by 3: 5 in all
                    domu.write(f"n{i}", b"")
                assert errno_name(lambda: domu.write("n9", b"")) == "ENOSPC"
                domu.rm("n0")
                assert errno_name(lambda: domu.write("n1", b"x" * 33)) == "ENOSPC"
                domu.write("n1", b"x" * 32)
                domu.watch("n1", "a")
                domu.watch("n2", "b")
                assert errno_name(lambda: domu.watch("n3", "c")) == "E2BIG"
                domu.transaction_start()
                assert errno_name(domu.transaction_start) == "ENOSPC"
                # dom0 has no quota
                dom0.write("/big", b"y" * 100)
                for i in range(10):
                    dom0.watch(f"/w{i}", "t")
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# -- bad input ------------------------------------------------------------------------------


def test_malformed_requests_get_error_replies(raw, dom0):
    cases = [
        (XsOp.READ, b"/no-nul", "EINVAL"),
        (XsOp.READ, b"/a\0/b\0", "EINVAL"),
        (XsOp.READ, b"/bad path\0", "EINVAL"),
        (XsOp.READ, b"/a//b\0", "EINVAL"),
        (XsOp.READ, b"/trailing/\0", "EINVAL"),
        (XsOp.READ, b"/\xff\0", "EINVAL"),
        (XsOp.WRITE, b"/no-nul-at-all", "EINVAL"),
        (XsOp.WATCH, b"/only-path\0", "EINVAL"),
        (XsOp.SET_PERMS, b"/a\0x5\0", "EINVAL"),
        (XsOp.SET_PERMS, b"/\0", "EINVAL"),
        (XsOp.DIRECTORY_PART, b"/\0notanumber\0", "EINVAL"),
        (XsOp.GET_DOMAIN_PATH, b"abc\0", "EINVAL"),
        (XsOp.INTRODUCE, b"0\0" + b"1\0" + b"1\0", "EINVAL"),
        (XsOp.WATCH_EVENT, b"/a\0t\0", "ENOSYS"),
        (XsOp.ERROR, b"EINVAL\0", "ENOSYS"),
        (20, b"", "ENOSYS"),  # the removed XS_RESTRICT
        (XsOp.INVALID, b"", "ENOSYS"),
        (123456, b"junk", "ENOSYS"),
        (XsOp.CONTROL, b"no-such-command\0", "EINVAL"),
    ]
    for req_id, (op, payload, expected) in enumerate(cases, start=10):
        reply = raw.call(op, payload, req_id=req_id)
        assert errno_of(reply) == expected, (op, payload)
    # unknown transaction, TRANSACTION_END without one or with a bad argument
    assert errno_of(raw.call(XsOp.READ, b"/\0", req_id=50, tx_id=77)) == "ENOENT"
    assert errno_of(raw.call(XsOp.TRANSACTION_END, b"T\0", req_id=51)) == "ENOENT"
    start = raw.call(XsOp.TRANSACTION_START, b"\0", req_id=52)
    tx = int(start.payload.rstrip(b"\0"))
    assert errno_of(raw.call(XsOp.TRANSACTION_END, b"X\0", req_id=53, tx_id=tx)) == "EINVAL"
    assert errno_of(raw.call(XsOp.TRANSACTION_START, b"\0", req_id=54, tx_id=tx)) == "EBUSY"
    assert raw.call(XsOp.TRANSACTION_END, b"F\0", req_id=55, tx_id=tx).payload == b"OK\0"
    assert raw.call(XsOp.CONTROL, b"help\0", req_id=56).op == XsOp.CONTROL
    # the connection is still in sync, and so is everybody else
    assert raw.call(XsOp.GET_DOMAIN_PATH, b"7\0", req_id=60).payload == b"/local/domain/7\0"
    dom0.write("/still", b"fine")


def test_oversize_frame_closes_only_that_connection(raw, xenstored, dom0):
    raw.send_raw(struct.pack("<IIII", XsOp.WRITE, 1, 0, 5000))
    assert raw.closed_by_server()
    dom0.write("/after", b"ok")
    assert dom0.read("/after") == b"ok"
    with pytest.raises(XenstoreError) as exc:  # our client refuses to send one at all
        dom0.write("/big", b"x" * 4096)
    assert exc.value.errno_name == "E2BIG"


def test_replies_split_and_pipelined(raw):
    frames = b"".join(
        encode(Message(XsOp.GET_DOMAIN_PATH, i, 0, f"{i}\0".encode())) for i in range(1, 6)
    )
    for i in range(len(frames)):  # one byte at a time
        raw.send_raw(frames[i : i + 1])
    replies = [raw.recv() for _ in range(5)]
    assert [(m.req_id, m.payload) for m in replies] == [
        (i, f"/local/domain/{i}\0".encode()) for i in range(1, 6)
    ]


def test_client_killed_mid_request_does_not_disturb_others(xenstored, dom0):
    script = (
        "import socket, struct, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(struct.pack('<IIII', 4, 1, 0, 7) + b'/k\\0tok\\0')\n"  # WATCH
        "s.sendall(struct.pack('<IIII', 6, 2, 0, 1) + b'\\0')\n"  # TRANSACTION_START
        "s.sendall(struct.pack('<IIII', 11, 3, 0, 100) + b'/k/half')\n"  # half a WRITE
        "print('sent', flush=True); time.sleep(60)\n"
    )
    victim = subprocess.Popen([sys.executable, "-c", script, xenstored], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline() == "sent\n"
        victim.kill()
    finally:
        victim.wait()
        if victim.stdout is not None:
            victim.stdout.close()
    dom0.write("/k/after", b"1")  # would have fired the dead client's watch
    assert dom0.read("/k/after") == b"1"
    assert not dom0.exists("/k/half")


def test_stalled_reader_does_not_block_server(raw, dom0):
    # A client that sends many requests and never reads its replies.
    request = encode(Message(XsOp.DIRECTORY, 1, 0, b"/\0"))
    raw.sock.setblocking(False)
    sent = 0
    try:
        for _ in range(20000):
            raw.sock.send(request)
            sent += 1
    except BlockingIOError:
        pass
    assert sent > 100
    dom0.write("/alive", b"1")
    assert dom0.read("/alive") == b"1"


# -- lifecycle ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_removes_sockets(sockdir, signum):
    path = os.path.join(sockdir, "s")
    proc = spawn_xenstored(path)
    with XenstoreClient.connect(path, timeout=5.0) as dom0:
        dom0.introduce(2, 1, 1)
        assert os.path.exists(domain_socket_path(path, 2))
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
        with pytest.raises(XenstoreError):
            dom0.read("/")
    assert not os.path.exists(path)
    assert not os.path.exists(domain_socket_path(path, 2))


def test_stale_socket_is_replaced_live_one_refused(sockdir):
    path = os.path.join(sockdir, "stale")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)
    leftover.close()  # a socket file nobody listens on
    proc = spawn_xenstored(path)
    try:
        with XenstoreClient.connect(path, timeout=5.0) as dom0:
            dom0.write("/x", b"1")
        second = subprocess.run(
            [sys.executable, "-m", "xentools.platform.sim.xenstored", "--socket", path],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert second.returncode == 1 and "served by another process" in second.stderr
        with XenstoreClient.connect(path, timeout=5.0) as dom0:
            assert dom0.read("/x") == b"1"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_in_process_server_thread_and_internal_errors(sockdir):
    path = os.path.join(sockdir, "inproc")
    logged: list[str] = []
    server = Xenstored(path, log=logged.append)
    server.start()
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:

        def broken(conn, tree, msg):
            raise RuntimeError("bug in a handler")

        server._handler_table[XsOp.GET_DOMAIN_PATH] = broken
        with XenstoreClient.connect(path, timeout=5.0) as client:
            with pytest.raises(XenstoreError) as exc:
                client.get_domain_path(1)
            assert exc.value.errno_name == "EIO"  # one request fails, the server goes on
            client.write("/ok", b"1")
            assert client.read("/ok") == b"1"
        assert any("bug in a handler" in line for line in logged)
    finally:
        server.stop()
        thread.join(10)
        server.close()
    assert not thread.is_alive()
    assert not os.path.exists(path)
