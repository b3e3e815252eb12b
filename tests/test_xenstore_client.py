"""Our xenstore client: every method against the software xenstored, and failure handling
against scripted servers that stall, hang up, or misbehave."""

from __future__ import annotations

import itertools
import os
import select
import socket
import threading
import time
import tty
from collections.abc import Callable, Iterator

import pytest

from xentools.core.xs_wire import FrameDecoder, Message, XsOp, encode, error_payload, join_strings, split_strings
from xentools.platform.interface import XenstoreError, XenstoreTimeout
from xentools.platform.sim.xenstored import domain_socket_path
from xentools.platform.xenstore import XenstoreClient, default_path, run_transaction


@pytest.fixture
def xs(xenstored) -> Iterator[XenstoreClient]:
    with XenstoreClient.connect(xenstored, timeout=5.0) as client:
        yield client


class ScriptedServer:
    """Accepts connections on a unix socket and answers each decoded request with whatever
    `script(msg)` returns: a list of frames (bytes), or None to hang up."""

    def __init__(self, path: str, script: Callable[[Message], list[bytes] | None]) -> None:
        self.path = path
        self.script = script
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.stop_r, self.stop_w = os.pipe()
        self.requests: list[Message] = []
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conns: dict[socket.socket, FrameDecoder] = {}
        try:
            while True:
                ready, _, _ = select.select([self.listener, self.stop_r, *conns], [], [])
                if self.stop_r in ready:
                    return
                for sock in ready:
                    if sock is self.listener:
                        conn, _ = self.listener.accept()
                        conns[conn] = FrameDecoder()
                        continue
                    data = sock.recv(65536)
                    if not data:
                        del conns[sock]
                        sock.close()
                        continue
                    for msg in conns[sock].feed(data):
                        self.requests.append(msg)
                        frames = self.script(msg)
                        if frames is None:
                            del conns[sock]
                            sock.close()
                            break
                        for frame in frames:
                            sock.sendall(frame)
        except BaseException as err:  # noqa: BLE001 - reported by close()
            self.failure = err
        finally:
            for sock in conns:
                sock.close()

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        self.thread.join(5)
        self.listener.close()
        os.close(self.stop_r)
        os.close(self.stop_w)
        assert self.failure is None, self.failure


def reply(msg: Message, payload: bytes, op: int | None = None) -> bytes:
    return encode(Message(msg.op if op is None else op, msg.req_id, msg.tx_id, payload))


@pytest.fixture
def scripted(sockdir) -> Iterator[Callable[[Callable[[Message], list[bytes] | None]], str]]:
    servers: list[ScriptedServer] = []

    def start(script: Callable[[Message], list[bytes] | None]) -> str:
        path = os.path.join(sockdir, f"fake{len(servers)}")
        servers.append(ScriptedServer(path, script))
        return path

    yield start
    for srv in servers:
        srv.close()


# -- connecting -----------------------------------------------------------------------------


def test_connect_errors_are_one_clear_line(sockdir):
    missing = os.path.join(sockdir, "nope")
    with pytest.raises(XenstoreError) as exc:
        XenstoreClient.connect(missing)
    assert str(exc.value) == f"xenstore: cannot connect to {missing}: No such file or directory"
    assert exc.value.errno_name is None
    dead = os.path.join(sockdir, "dead")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(dead)
    sock.close()
    with pytest.raises(XenstoreError, match=f"cannot connect to {dead}: Connection refused"):
        XenstoreClient.connect(dead)


def test_default_path_order(monkeypatch, xenstored):
    monkeypatch.setenv("XENSTORED_PATH", xenstored)
    assert default_path() == xenstored
    with XenstoreClient.connect(timeout=5.0) as client:  # path None: $XENSTORED_PATH
        assert client.path == xenstored
        assert client.get_domain_path(1) == "/local/domain/1"
    monkeypatch.delenv("XENSTORED_PATH")
    expected = "/run/xenstored/socket" if os.path.exists("/run/xenstored/socket") else "/dev/xen/xenbus"
    assert default_path() == expected


def test_character_device_path(xenstored):
    """A path that is not a socket is opened O_RDWR like /dev/xen/xenbus; a raw pty relayed
    to the server stands in for the xenbus device."""
    master, slave = os.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.connect(xenstored)
    stop_r, stop_w = os.pipe()

    def relay() -> None:
        while True:
            ready, _, _ = select.select([master, upstream, stop_r], [], [])
            if stop_r in ready:
                return
            if master in ready:
                upstream.sendall(os.read(master, 65536))
            if upstream in ready:
                data = upstream.recv(65536)
                if not data:
                    return
                os.write(master, data)

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        with XenstoreClient.connect(device, timeout=5.0) as client:
            client.write("/dev-test/x", b"\x00\x01\xff binary")
            assert client.read("/dev-test/x") == b"\x00\x01\xff binary"
            client.watch("/dev-test", "t")
            assert client.read_watch(2.0) == ("/dev-test", "t")
    finally:
        os.write(stop_w, b"x")
        thread.join(5)
        for fd in (master, slave, stop_r, stop_w):
            os.close(fd)
        upstream.close()


# -- every method against the software xenstored --------------------------------------------


def test_database_methods(xs):
    xs.write("/c/a", b"1")
    xs.write("/c/text", "unicode é")
    xs.write("/c/empty", b"")
    xs.mkdir("/c/dir/sub")
    assert xs.read("/c/a") == b"1"
    assert xs.read("/c/text") == "unicode é".encode()
    assert xs.read("/c/empty") == b""
    assert xs.directory("/c") == ["a", "text", "empty", "dir"]
    assert xs.directory("/c/dir/sub") == []
    assert xs.exists("/c/dir") and not xs.exists("/c/none")
    xs.rm("/c/dir")
    xs.rm("/c/dir")  # removing a missing node whose parent exists is fine
    assert not xs.exists("/c/dir/sub")
    with pytest.raises(XenstoreError) as exc:
        xs.rm("/c/none/deeper")
    assert exc.value.errno_name == "ENOENT"
    with pytest.raises(XenstoreError) as exc:
        xs.read("/c/none")
    assert exc.value.errno_name == "ENOENT"
    assert str(exc.value) == "xenstore: READ /c/none: ENOENT"


def test_perms_methods(xs):
    xs.write("/perm/x", b"")
    assert xs.get_perms("/perm/x") == ["n0"]
    xs.set_perms("/perm/x", ["b0", "r5"])
    assert xs.get_perms("/perm/x") == ["b0", "r5"]
    xs.write("/perm/x/child", b"")
    assert xs.get_perms("/perm/x/child") == ["b0", "r5"]  # inherited
    assert xs.get_perms("@releaseDomain") == ["n0"]
    for bad in ([], ["q1"], ["b70000"]):
        with pytest.raises(XenstoreError) as exc:
            xs.set_perms("/perm/x", bad)
        assert exc.value.errno_name == "EINVAL"


def test_bad_arguments_fail_before_sending(xs):
    for call in (
        lambda: xs.read("/a//b"),
        lambda: xs.write("no spaces", b""),
        lambda: xs.read("@releaseDomain"),
        lambda: xs.read("/a", tx=-1),
        lambda: xs.watch("/a", "nul\0inside"),
    ):
        with pytest.raises(XenstoreError) as exc:
            call()
        assert exc.value.errno_name == "EINVAL"
    with pytest.raises(XenstoreError) as exc:
        xs.write("/big", b"x" * 5000)
    assert exc.value.errno_name == "E2BIG"
    assert xs.get_domain_path(0) == "/local/domain/0"  # the connection is unharmed


def test_directory_falls_back_to_directory_part(xs):
    names = [f"node-{i:05d}" for i in range(800)]
    with xs.transaction() as tx:
        for name in names:
            xs.write(f"/many/{name}", b"", tx)
    assert xs.directory("/many") == names


def test_watch_methods_and_fileno(xs):
    fd = xs.fileno()
    assert select.select([fd], [], [], 0)[0] == []
    xs.watch("/wm", "tok")
    assert select.select([fd], [], [], 2.0)[0] == [fd]  # the initial event
    assert xs.read_watch(1.0) == ("/wm", "tok")
    assert select.select([fd], [], [], 0)[0] == []
    # An event caused by our own write arrives before the write's reply: still queued.
    xs.write("/wm/a", b"1")
    xs.write("/wm/b", b"2")
    assert select.select([fd], [], [], 0)[0] == [fd]
    assert [xs.read_watch(1.0), xs.read_watch(1.0)] == [("/wm/a", "tok"), ("/wm/b", "tok")]
    assert xs.read_watch(0.1) is None
    xs.unwatch("/wm", "tok")
    xs.write("/wm/c", b"3")
    assert xs.read_watch(0.2) is None
    xs.watch("/wm", "again")
    assert xs.read_watch(1.0) == ("/wm", "again")
    xs.reset_watches()
    xs.write("/wm/d", b"4")
    assert xs.read_watch(0.2) is None


def test_transaction_methods(xenstored, xs):
    xs.write("/t/v", b"0")
    tx = xs.transaction_start()
    assert tx != 0
    xs.write("/t/v", b"1", tx)
    assert xs.read("/t/v") == b"0"
    assert xs.transaction_end(tx) is True
    assert xs.read("/t/v") == b"1"
    tx = xs.transaction_start()
    xs.write("/t/v", b"2", tx)
    assert xs.transaction_end(tx, commit=False) is True
    assert xs.read("/t/v") == b"1"
    with pytest.raises(RuntimeError), xs.transaction() as tx:
        xs.write("/t/v", b"3", tx)
        raise RuntimeError("abort me")
    assert xs.read("/t/v") == b"1"
    with XenstoreClient.connect(xenstored, timeout=5.0) as other:
        with pytest.raises(XenstoreError) as exc, xs.transaction() as tx:
            xs.read("/t/v", tx)
            other.write("/t/v", b"other")
        assert exc.value.errno_name == "EAGAIN"
    with pytest.raises(XenstoreError) as exc:
        xs.transaction_end(tx)  # already ended
    assert exc.value.errno_name == "ENOENT"


def test_run_transaction_repeats_a_conflict_and_gives_up_with_eagain(xenstored, xs):
    xs.write("/rt/v", b"0")
    runs = []
    with XenstoreClient.connect(xenstored, timeout=5.0) as other:
        def work(tx: int) -> bytes:
            seen = xs.read("/rt/v", tx)
            runs.append(seen)
            if len(runs) == 1:
                other.write("/rt/v", b"other")  # the first commit conflicts
            xs.write("/rt/w", seen, tx)
            return seen

        assert run_transaction(xs, work, what="copying /rt/v") == b"other"
        assert runs == [b"0", b"other"]
        assert xs.read("/rt/w") == b"other"

        def always_conflicts(tx: int) -> None:
            runs.append(xs.read("/rt/v", tx))
            other.write("/rt/v", b"%d" % len(runs))

        runs.clear()
        with pytest.raises(XenstoreError) as exc:
            run_transaction(xs, always_conflicts, what="a busy node", attempts=3)
    assert exc.value.errno_name == "EAGAIN"
    assert str(exc.value) == "xenstore: a busy node: the transaction conflicted 3 times"
    assert len(runs) == 3


def test_run_transaction_aborts_and_does_not_repeat_other_errors(xs):
    runs = []

    def work(tx: int) -> None:
        runs.append(tx)
        xs.write("/ra/v", b"1", tx)
        xs.read("/ra/missing", tx)  # ENOENT

    with pytest.raises(XenstoreError) as exc:
        run_transaction(xs, work, what="reading a missing node")
    assert exc.value.errno_name == "ENOENT"
    assert len(runs) == 1
    assert not xs.exists("/ra/v")  # aborted


def test_domain_methods(xenstored, xs):
    assert xs.get_domain_path(12) == "/local/domain/12"
    assert not xs.is_introduced(12)
    xs.introduce(12, 4096, 5)
    assert xs.is_introduced(12)
    with XenstoreClient.connect(domain_socket_path(xenstored, 12), timeout=5.0) as domu:
        with pytest.raises(XenstoreError) as exc:
            domu.read("/tool")
        assert exc.value.errno_name == "EACCES"
    xs.release(12)
    assert not xs.is_introduced(12)


def test_threads_share_one_client(xs):
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(40):
                xs.write(f"/thr/{n}/{i}", str(i))
                assert xs.read(f"/thr/{n}/{i}") == str(i).encode()
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    xs.watch("/thr", "w")
    seen = 0
    while xs.read_watch(0.5) is not None:
        seen += 1
    for t in threads:
        t.join()
    assert errors == []
    assert seen >= 1
    assert sorted(xs.directory("/thr")) == [str(n) for n in range(6)]


def test_close_is_idempotent_and_final(xenstored):
    client = XenstoreClient.connect(xenstored, timeout=5.0)
    client.write("/closing", b"1")
    client.close()
    client.close()
    with pytest.raises(XenstoreError, match="closed"):
        client.read("/closing")
    with pytest.raises(XenstoreError):
        client.read_watch(0.1)


# -- failures -------------------------------------------------------------------------------


def _listing_server(generations: Callable[[], int]):  # type: ignore[no-untyped-def]
    """A script: DIRECTORY answers E2BIG; DIRECTORY_PART lists "a" then "b", one name a part,
    each part stamped with generations()."""

    def script(msg: Message) -> list[bytes]:
        if msg.op == XsOp.DIRECTORY:
            return [reply(msg, error_payload("E2BIG"), XsOp.ERROR)]
        offset = int(split_strings(msg.payload)[1])
        part = {0: b"a\0", 2: b"b\0\0"}[offset]
        return [reply(msg, b"%d\0" % generations() + part)]

    return script


def test_directory_part_restarts_when_the_directory_changes(scripted):
    parts = itertools.count()
    # The first listing sees generation 0 then 1 (changed): it starts again and sees 2, 2.
    path = scripted(_listing_server(lambda: min(next(parts), 2)))
    with XenstoreClient.connect(path, timeout=5.0) as client:
        assert client.directory("/d") == ["a", "b"]
    assert next(parts) == 4  # two parts served, then two again


def test_directory_part_gives_up_when_the_directory_never_holds_still(scripted):
    parts = itertools.count()
    path = scripted(_listing_server(lambda: next(parts)))
    with XenstoreClient.connect(path, timeout=5.0) as client:
        with pytest.raises(XenstoreError) as exc:
            client.directory("/d")
    assert exc.value.errno_name == "EAGAIN"
    assert str(exc.value) == "xenstore: DIRECTORY_PART /d: kept changing while listed"
    assert next(parts) == 2 * 16  # every one of the 16 listings saw a change at its 2nd part


def test_timeout_when_server_never_answers(scripted):
    path = scripted(lambda msg: [])
    with XenstoreClient.connect(path, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(XenstoreTimeout) as exc:
            client.read("/x")
        assert 0.4 < time.monotonic() - start < 3.0
        assert exc.value.errno_name is None
        assert "no reply within 0.5 s" in str(exc.value)


def test_connection_dropped_mid_request_raises_not_hangs(scripted):
    path = scripted(lambda msg: None)  # read the request, then hang up
    with XenstoreClient.connect(path, timeout=30.0) as client:
        start = time.monotonic()
        with pytest.raises(XenstoreError) as exc:
            client.read("/x")
        assert not isinstance(exc.value, XenstoreTimeout)
        assert time.monotonic() - start < 5.0
        assert "closed by the server" in str(exc.value)
        with pytest.raises(XenstoreError, match="closed by the server"):
            client.write("/y", b"")  # fails at once afterwards
        with pytest.raises(XenstoreError):
            client.read_watch(None)  # does not wait forever either


def test_half_reply_then_hang_up(scripted):
    path = scripted(lambda msg: [reply(msg, b"partial")[:10]] if msg.op == XsOp.READ else [])
    with XenstoreClient.connect(path, timeout=0.5) as client:
        with pytest.raises(XenstoreTimeout):
            client.read("/x")


def test_late_reply_is_dropped_and_next_request_matches(scripted):
    held: list[Message] = []

    def script(msg: Message) -> list[bytes]:
        if msg.payload == b"/slow\0":
            held.append(msg)
            return []
        # answer the held request now (too late), then this one
        frames = [reply(m, b"late") for m in held]
        held.clear()
        return [*frames, reply(msg, b"fresh")]

    path = scripted(script)
    with XenstoreClient.connect(path, timeout=0.3) as client:
        with pytest.raises(XenstoreTimeout):
            client.read("/slow")
        assert client.read("/fast") == b"fresh"


def test_events_while_waiting_for_a_reply_are_queued(scripted):
    def script(msg: Message) -> list[bytes]:
        event = encode(Message(XsOp.WATCH_EVENT, 0, 0, join_strings(["/e", "tok"])))
        return [event, event[:5], event[5:] + reply(msg, b"value")]

    path = scripted(script)
    with XenstoreClient.connect(path, timeout=2.0) as client:
        assert client.read("/x") == b"value"
        assert client.read_watch(1.0) == ("/e", "tok")
        assert client.read_watch(1.0) == ("/e", "tok")
        assert client.read_watch(0.1) is None


def test_error_names_are_passed_on(scripted):
    path = scripted(
        lambda msg: [reply(msg, error_payload("EACCES") if msg.payload == b"/a\0" else b"EFUTURE\0", XsOp.ERROR)]
    )
    with XenstoreClient.connect(path, timeout=2.0) as client:
        with pytest.raises(XenstoreError) as exc:
            client.read("/a")
        assert exc.value.errno_name == "EACCES"
        with pytest.raises(XenstoreError) as exc:
            client.read("/b")
        assert exc.value.errno_name == "EFUTURE"


def test_protocol_violations_break_the_connection(scripted):
    def script(msg: Message) -> list[bytes]:
        if msg.payload == b"/wrong-type\0":
            return [reply(msg, b"OK\0", XsOp.WRITE)]
        return [encode(Message(999, msg.req_id, 0, b""))]

    with XenstoreClient.connect(scripted(script), timeout=2.0) as client:
        with pytest.raises(XenstoreError, match="answered READ with"):
            client.read("/wrong-type")
        with pytest.raises(XenstoreError):
            client.read("/anything")
    with XenstoreClient.connect(scripted(script), timeout=2.0) as client:
        with pytest.raises(XenstoreError, match="xs_wire.unknown_op"):
            client.read("/unknown-op")
