"""Our xenstore client: xs_wire requests with timeouts, over a unix socket or /dev/xen/xenbus.

Owns: one connection to a xenstored (the dom0 unix socket, the software xenstored's sockets,
or a domU's /dev/xen/xenbus character device: same framing, opened O_RDWR), request/reply
matching by req_id, the queue of watch events, and the translation of every failure into
XenstoreError (server errors carry `errno_name`) or XenstoreTimeout; and `run_transaction`,
the one place in xentools where a whole transaction is repeated after a conflicting commit
(EAGAIN), for every caller (toolstack, blkback, blkfront). Both repeats (that one and a
DIRECTORY_PART listing restarted when the directory changes) go through tenacity.
Must not: retry a single request on its own, interpret node contents, or ever block without
a timeout on a reply: a dropped connection fails every waiting request at once (pyxs 0.4.1
hangs there).

Threads: a reader thread owns the file descriptor's input side; it hands each reply to the
request waiting for its req_id and queues watch events (also those arriving while a request
waits), so any number of caller threads plus one thread in read_watch() may share a client.
fileno() is a pipe that is readable exactly while read_watch() has an event to return (as
libxenstore's xs_fileno()).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

from xentools.core.errors import XsWireError
from xentools.core.xs_wire import (
    PAYLOAD_MAX,
    FrameDecoder,
    Message,
    XsOp,
    directory_part_request,
    encode,
    error_name,
    join_strings,
    parse_decimal,
    parse_directory_part_reply,
    parse_perm,
    parse_watch_event,
    path_arg,
    split_strings,
    validate_path,
    write_payload,
)
from xentools.platform.interface import XenstoreError, XenstoreTimeout

__all__ = [
    "DEFAULT_SOCKET", "TRANSACTION_ATTEMPTS", "XENBUS_DEVICE", "XENBUS_PROC", "XenstoreClient", "default_path",
    "run_transaction",
]

DEFAULT_SOCKET = "/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"
XENBUS_PROC = "/proc/xen/xenbus"  # the same device, from xenfs (older Linux, no devtmpfs)
_DIRECTORY_PART_RETRIES = 16
# libxl repeats a conflicting transaction without a bound; we stop, and say so, after this many.
TRANSACTION_ATTEMPTS = 20
# A domU meets EACCES where the toolstack did not give it a node (e.g. a vbd whose frontend
# directory it does not own): the fix is in dom0.
EACCES_FIX = ("this domain has no permission on that node: the toolstack in dom0 must grant it "
              "(xenstore-chmod; a vbd's frontend directory must be owned by the frontend's domain "
              "and its backend directory readable by it: xentools vbd create --frontend-domid N)")
_T = TypeVar("_T")  # restarts when the directory changes between parts


def default_path() -> str:
    """$XENSTORED_PATH, else the dom0 socket if present, else the domU xenbus device (the
    order libxenstore's xs_open() follows), or xenfs's copy of it when only that exists."""
    env = os.environ.get("XENSTORED_PATH")
    if env:
        return env
    if os.path.exists(DEFAULT_SOCKET):
        return DEFAULT_SOCKET
    if not os.path.exists(XENBUS_DEVICE) and os.path.exists(XENBUS_PROC):
        return XENBUS_PROC
    return XENBUS_DEVICE


def _hint(target: str) -> str:
    """The fix, when `target` is a software Xen's xenstored socket that nothing serves."""
    from xentools.platform.sim.platform import XENSTORED_SOCKET  # the sim imports this module

    root, name = os.path.split(os.path.abspath(target))
    if name == XENSTORED_SOCKET:
        domid = 0
    elif name.startswith(XENSTORED_SOCKET + ".d") and name[len(XENSTORED_SOCKET) + 2:].isdigit():
        domid = int(name[len(XENSTORED_SOCKET) + 2:])
    else:
        return ""
    start = f"`xentools sim start --sim-dir {root}{f' --domid {domid}' if domid else ''}`"
    if domid and os.path.exists(os.path.join(root, XENSTORED_SOCKET)):
        return f": the software Xen at {root} has no domain {domid}: start it with {start}"
    return f": no software Xen at {root}: start one with {start}"


@dataclass
class _Pending:
    event: threading.Event
    reply: Message | None = None


class XenstoreClient:
    """A connection to xenstored. Create with XenstoreClient.connect(); close() when done
    (or use it as a context manager). `timeout` bounds every request, in seconds."""

    def __init__(self, path: str, *, sock: socket.socket | None, fd: int | None, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = sock
        self._fd = sock.fileno() if sock is not None else fd
        assert self._fd is not None
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._watch_cond = threading.Condition(self._state_lock)
        self._pending: dict[int, _Pending] = {}
        self._events: collections.deque[tuple[str, str]] = collections.deque()
        self._req_ids = itertools.count(1)
        self._dead: str | None = None
        self._closed = False
        self._watch_r, self._watch_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        for fd_ in (self._watch_r, self._watch_w, self._wake_r, self._wake_w):
            os.set_blocking(fd_, False)
        self._reader = threading.Thread(target=self._read_loop, name=f"xenstore-reader {path}", daemon=True)
        self._reader.start()

    # -- opening and closing ---------------------------------------------------------------

    @classmethod
    def connect(cls, path: str | None = None, timeout: float = 10.0) -> XenstoreClient:
        """Connect to `path` (default: see default_path()). A unix socket is connected; any
        other file (the xenbus device) is opened O_RDWR."""
        target = path or default_path()
        try:
            is_socket = stat.S_ISSOCK(os.stat(target).st_mode)
        except OSError as err:
            raise XenstoreError(f"xenstore: cannot connect to {target}: {err.strerror}{_hint(target)}") from None
        if is_socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)  # bounds connect() and every sendall()
            try:
                sock.connect(target)
            except TimeoutError:
                sock.close()
                raise XenstoreTimeout(f"xenstore: cannot connect to {target}: timed out") from None
            except OSError as err:
                sock.close()
                raise XenstoreError(f"xenstore: cannot connect to {target}: {err.strerror or err}"
                                    f"{_hint(target)}") from None
            return cls(target, sock=sock, fd=None, timeout=timeout)
        try:
            fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise XenstoreError(f"xenstore: cannot connect to {target}: {err.strerror}") from None
        return cls(target, sock=None, fd=fd, timeout=timeout)

    def close(self) -> None:
        """Close the connection; waiting requests fail, read_watch() raises. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._fail_all_locked("xenstore: client closed")
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5.0)
        if self._sock is not None:
            self._sock.close()
        elif self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        for fd_ in (self._watch_r, self._watch_w, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd_)

    def __enter__(self) -> XenstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """A descriptor readable while a watch event waits for read_watch()."""
        return self._watch_r

    # -- the reader thread -----------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = FrameDecoder()
        sel = selectors.DefaultSelector()
        reason = f"xenstore: connection to {self.path} closed by the server"
        try:
            sel.register(self._fd, selectors.EVENT_READ)  # type: ignore[arg-type]
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                ready = {key.fd for key, _ in sel.select()}
                if self._wake_r in ready or self._closed:
                    break
                data = self._sock.recv(65536) if self._sock is not None else os.read(self._fd, 65536)  # type: ignore[arg-type]
                if not data:
                    break
                for msg in decoder.feed(data):
                    self._dispatch(msg)
        except XsWireError as err:
            reason = f"xenstore: {self.path}: server broke the protocol: {err}"
        except OSError as err:
            reason = f"xenstore: connection to {self.path} lost: {err.strerror or err}"
        except Exception as err:  # noqa: BLE001 - a reader must never die silently
            reason = f"xenstore: reader of {self.path} failed: {err!r}"
        finally:
            sel.close()
            with self._state_lock:
                self._fail_all_locked(reason)

    def _dispatch(self, msg: Message) -> None:
        if not msg.known:
            raise XsWireError("xs_wire.unknown_op", f"server sent type {int(msg.op)}")
        if msg.op == XsOp.WATCH_EVENT:
            event = parse_watch_event(msg.payload)
            with self._state_lock:
                self._events.append(event)
                if len(self._events) == 1:
                    with contextlib.suppress(OSError):
                        os.write(self._watch_w, b"!")
                self._watch_cond.notify_all()
            return
        with self._state_lock:
            pending = self._pending.pop(msg.req_id, None)
        if pending is not None:  # else: a late reply to a request that timed out
            pending.reply = msg
            pending.event.set()

    def _fail_all_locked(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        for pending in self._pending.values():
            pending.event.set()
        self._pending.clear()
        self._watch_cond.notify_all()

    # -- requests --------------------------------------------------------------------------

    def _request(self, op: XsOp, payload: bytes, tx: int, what: str) -> bytes:
        if len(payload) > PAYLOAD_MAX:
            # libxenstore's xs_talkv() refuses these with E2BIG before sending anything.
            raise XenstoreError(
                f"xenstore: {op.name} {what}: xs_wire.payload_too_long: {len(payload)} bytes > {PAYLOAD_MAX}",
                errno_name="E2BIG",
            )
        if not isinstance(tx, int) or not 0 <= tx <= 0xFFFFFFFF:
            raise XenstoreError(f"xenstore: {op.name} {what}: transaction id {tx!r} is not a u32", errno_name="EINVAL")
        pending = _Pending(threading.Event())
        with self._send_lock:
            with self._state_lock:
                if self._dead is not None:
                    raise XenstoreError(self._dead)
                req_id = next(self._req_ids) & 0xFFFFFFFF
                while req_id in self._pending:
                    req_id = next(self._req_ids) & 0xFFFFFFFF
                self._pending[req_id] = pending
            frame = Message(op, req_id, tx, payload)
            try:
                self._write(frame)
            except TimeoutError:
                self._broken(f"xenstore: {op.name} {what}: {self.path} does not accept requests")
                raise XenstoreTimeout(f"xenstore: {op.name} {what}: sending timed out") from None
            except OSError as err:
                self._broken(f"xenstore: connection to {self.path} lost: {err.strerror or err}")
                raise XenstoreError(f"xenstore: {op.name} {what}: {err.strerror or err}") from None
        if not pending.event.wait(self.timeout):
            with self._state_lock:
                self._pending.pop(req_id, None)
            if pending.reply is None:
                raise XenstoreTimeout(f"xenstore: {op.name} {what}: no reply within {self.timeout:g} s")
        reply = pending.reply
        if reply is None:
            raise XenstoreError(self._dead or "xenstore: connection closed")
        if reply.op == XsOp.ERROR:
            try:
                name = error_name(reply.payload)
            except XsWireError as err:
                raise XenstoreError(f"xenstore: {op.name} {what}: {err}") from None
            hint = f"; {EACCES_FIX}" if name == "EACCES" else ""
            raise XenstoreError(f"xenstore: {op.name} {what}: {name}{hint}", errno_name=name)
        if reply.op != op:
            self._broken(f"xenstore: {self.path} answered {op.name} with {reply.op!r}")
            raise XenstoreError(self._dead or "xenstore: protocol error")
        return reply.payload

    def _write(self, frame: Message) -> None:
        data = encode(frame)
        if self._sock is not None:
            self._sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)  # type: ignore[arg-type]
            view = view[written:]

    def _broken(self, reason: str) -> None:
        with self._state_lock:
            self._fail_all_locked(reason)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    @staticmethod
    def _path(path: str, *, special_ok: bool = False) -> str:
        try:
            return validate_path(path, relative_ok=True, special_ok=special_ok)
        except XsWireError as err:
            raise XenstoreError(f"xenstore: {err}", errno_name="EINVAL") from None

    @staticmethod
    def _strings(what: str, *parts: str) -> bytes:
        try:
            return join_strings(list(parts))
        except XsWireError as err:
            raise XenstoreError(f"xenstore: {what}: {err}", errno_name="EINVAL") from None

    @staticmethod
    def _parse(what: str, fn: Callable[..., _T], *args: object) -> _T:
        try:
            return fn(*args)
        except XsWireError as err:
            raise XenstoreError(f"xenstore: {what}: bad reply: {err}") from None

    # -- the database ----------------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        return self._request(XsOp.READ, self._path(path).encode() + b"\0", tx, path)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._request(XsOp.WRITE, write_payload(self._path(path), data), tx, path)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self._request(XsOp.MKDIR, self._path(path).encode() + b"\0", tx, path)

    def rm(self, path: str, tx: int = 0) -> None:
        self._request(XsOp.RM, self._path(path).encode() + b"\0", tx, path)

    def exists(self, path: str, tx: int = 0) -> bool:
        """True if `path` exists (and is readable); False on ENOENT; other errors raise."""
        try:
            self.read(path, tx)
        except XenstoreError as err:
            if err.errno_name == "ENOENT":
                return False
            raise
        return True

    def directory(self, path: str, tx: int = 0) -> list[str]:
        """Names of the children of `path`. Falls back to DIRECTORY_PART when the list does
        not fit in one reply (E2BIG), restarting if the node changes between parts."""
        self._path(path)
        try:
            payload = self._request(XsOp.DIRECTORY, path.encode() + b"\0", tx, path)
        except XenstoreError as err:
            if err.errno_name != "E2BIG":
                raise
            return self._directory_part(path, tx)
        return self._parse(f"DIRECTORY {path}", split_strings, payload)

    def _directory_part(self, path: str, tx: int) -> list[str]:
        def once() -> list[str]:
            collected = b""
            first_gen: str | None = None
            while True:
                payload = self._request(XsOp.DIRECTORY_PART, directory_part_request(path, len(collected)), tx, path)
                gen, chunk, last = self._parse(f"DIRECTORY_PART {path}", parse_directory_part_reply, payload)
                if first_gen is None:
                    first_gen = gen
                elif gen != first_gen:  # changed between parts: start again
                    raise XenstoreError(f"xenstore: DIRECTORY_PART {path}: changed while listed", errno_name="EAGAIN")
                collected += chunk
                if last:
                    return self._parse(f"DIRECTORY_PART {path}", split_strings, collected)

        return _repeat_on_eagain(once, _DIRECTORY_PART_RETRIES,
                                 f"xenstore: DIRECTORY_PART {path}: kept changing while listed")

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        """Permission strings, owner first: e.g. ["b0", "r3"]."""
        payload = self._request(XsOp.GET_PERMS, self._path(path, special_ok=True).encode() + b"\0", tx, path)
        return self._parse(f"GET_PERMS {path}", split_strings, payload)

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        try:
            checked = [str(parse_perm(p)) for p in perms]
        except XsWireError as err:
            raise XenstoreError(f"xenstore: SET_PERMS {path}: {err}", errno_name="EINVAL") from None
        if not checked:
            raise XenstoreError(f"xenstore: SET_PERMS {path}: no permissions (the owner is required)", errno_name="EINVAL")
        payload = self._strings(f"SET_PERMS {path}", self._path(path, special_ok=True), *checked)
        self._request(XsOp.SET_PERMS, payload, tx, path)

    # -- watches ---------------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        """Watch `path` (or @introduceDomain / @releaseDomain). xenstored fires it once at
        once; events come from read_watch()."""
        payload = self._strings(f"WATCH {path}", self._path(path, special_ok=True), token)
        self._request(XsOp.WATCH, payload, 0, path)

    def unwatch(self, path: str, token: str) -> None:
        payload = self._strings(f"UNWATCH {path}", self._path(path, special_ok=True), token)
        self._request(XsOp.UNWATCH, payload, 0, path)

    def read_watch(self, timeout: float | None = None) -> tuple[str, str] | None:
        """The next (path, token) event; None if none came within `timeout` seconds (None:
        wait as long as the connection lives). Raises XenstoreError once the connection is
        gone and no event is left."""
        with self._watch_cond:
            if not self._watch_cond.wait_for(lambda: self._events or self._dead is not None, timeout):
                return None
            if not self._events:
                raise XenstoreError(self._dead or "xenstore: connection closed")
            event = self._events.popleft()
            if not self._events:
                with contextlib.suppress(OSError, BlockingIOError):
                    os.read(self._watch_r, 64)
            return event

    def reset_watches(self) -> None:
        """RESET_WATCHES: the server forgets every watch and transaction of this client."""
        self._request(XsOp.RESET_WATCHES, b"\0", 0, "")

    # -- transactions ----------------------------------------------------------------------

    def transaction_start(self) -> int:
        payload = self._request(XsOp.TRANSACTION_START, b"\0", 0, "")
        text = self._parse("TRANSACTION_START", path_arg, payload)
        return self._parse("TRANSACTION_START", parse_decimal, text, "transaction id")

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        """End `tx`; False if the commit failed with EAGAIN (someone changed what it used:
        repeat the whole transaction). An abort always returns True."""
        try:
            self._request(XsOp.TRANSACTION_END, b"T\0" if commit else b"F\0", tx, f"{tx}")
        except XenstoreError as err:
            if commit and err.errno_name == "EAGAIN":
                return False
            raise
        return True

    def transaction(self) -> contextlib.AbstractContextManager[int]:
        """`with client.transaction() as tx:` commits on success, aborts on an exception.
        A conflicting commit raises XenstoreError with errno_name "EAGAIN" (run_transaction
        repeats it)."""
        return _transaction(self, "transaction")

    # -- domains ---------------------------------------------------------------------------

    def get_domain_path(self, domid: int) -> str:
        payload = self._request(XsOp.GET_DOMAIN_PATH, f"{domid}\0".encode(), 0, f"{domid}")
        return self._parse("GET_DOMAIN_PATH", path_arg, payload)

    def introduce(self, domid: int, mfn: int, port: int) -> None:
        self._request(XsOp.INTRODUCE, self._strings("INTRODUCE", str(domid), str(mfn), str(port)), 0, f"{domid}")

    def release(self, domid: int) -> None:
        self._request(XsOp.RELEASE, f"{domid}\0".encode(), 0, f"{domid}")

    def is_introduced(self, domid: int) -> bool:
        payload = self._request(XsOp.IS_DOMAIN_INTRODUCED, f"{domid}\0".encode(), 0, f"{domid}")
        answer = self._parse("IS_DOMAIN_INTRODUCED", path_arg, payload)
        if answer not in ("T", "F"):
            raise XenstoreError(f"xenstore: IS_DOMAIN_INTRODUCED {domid}: bad reply {answer!r}")
        return answer == "T"


@contextlib.contextmanager
def _transaction(xs: Any, what: str) -> Iterator[int]:
    """One transaction of `xs`: committed when the body returns, aborted when it raises;
    XenstoreError "EAGAIN" when the commit conflicts."""
    tx = xs.transaction_start()
    try:
        yield tx
    except BaseException:
        with contextlib.suppress(XenstoreError):
            xs.transaction_end(tx, commit=False)
        raise
    if not xs.transaction_end(tx, commit=True):
        raise XenstoreError(f"xenstore: {what}: transaction {tx} conflicted", errno_name="EAGAIN")


def _conflicted(err: BaseException) -> bool:
    return isinstance(err, XenstoreError) and err.errno_name == "EAGAIN"


def run_transaction(xs: Any, work: Callable[[int], _T], *, what: str,
                    attempts: int = TRANSACTION_ATTEMPTS) -> _T:
    """Run work(tx) in one transaction of `xs` (a XenstoreClient, or anything with its
    transaction_start/transaction_end) and commit it; return what work returned.

    A conflict (EAGAIN: another writer changed what the transaction read, reported by the
    commit or by a request inside it) runs the whole of work again in a fresh transaction,
    as xenstore(7) asks, up to `attempts` times; then XenstoreError "EAGAIN" naming `what`.
    Any other exception from work aborts the transaction and goes to the caller unchanged.
    """

    def once() -> _T:
        with _transaction(xs, what) as tx:
            return work(tx)

    return _repeat_on_eagain(once, attempts, f"xenstore: {what}: the transaction conflicted {attempts} times")


def _repeat_on_eagain(once: Callable[[], _T], attempts: int, exhausted: str) -> _T:
    """once(), called again while it raises XenstoreError "EAGAIN", at most `attempts` times
    in all; then XenstoreError "EAGAIN" with the message `exhausted`."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        retry=tenacity.retry_if_exception(_conflicted),
        reraise=True,
    )
    try:
        return retrying(once)
    except XenstoreError as err:
        if _conflicted(err):
            raise XenstoreError(exhausted, errno_name="EAGAIN") from None
        raise
