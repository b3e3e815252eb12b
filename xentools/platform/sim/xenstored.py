"""The software xenstored: xs_wire over unix sockets, for machines without Xen.

Owns: the listening sockets, the client connections (framing, output queues, watches,
transactions), the dispatch of every xsd_sockmsg_type, delivery of watch events, domain
introduction and release, and clean shutdown on SIGTERM/SIGINT (run through service.serve(),
as grantd is).
Must not: implement node semantics (xenstore_store.py does), block on one client, or let one
client's bad input disturb another.

Clients nobody here wrote work against it: Xen's xenstore-* tools and libxenstore
(XENSTORED_PATH=<socket>), and pyxs (Client(unix_socket_path=<socket>)).

Domains
-------
Every connection on the main socket acts as dom0 (privileged), as on a real dom0 socket.
When dom0 sends INTRODUCE <domid> <mfn> <port>, the server also listens on
``<socket>.d<domid>``: every connection to that socket acts as domain <domid>, unprivileged,
subject to permissions and quotas, with relative paths below /local/domain/<domid>. RELEASE
<domid> closes that socket and every connection on it (their watches and transactions are
dropped) and fires @releaseDomain. The mfn and port are recorded but not used: there is no
shared ring page, the socket stands in for it.

Robustness
----------
A header announcing more than XENSTORE_PAYLOAD_MAX bytes cannot be resynchronised: that
connection is closed, as xenstored does. Everything else malformed gets an XS_ERROR reply
with the same req_id: unknown types ENOSYS (as xenstored's process_message()), bad
arguments, missing NULs and bad paths EINVAL. A client that disconnects loses its watches and
transactions; a client that stops reading is disconnected once more than OUTPUT_LIMIT bytes
wait for it. Nothing a client sends can stop the server.

Run: ``python -m xentools.platform.sim.xenstored --socket PATH [--ready-fd N]``, or
run_xenstored(). Readiness: the socket exists and accepts, and, with ready_fd, the line
"READY\\n" has been written to that descriptor (then closed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import selectors
import socket
import stat
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from xentools.core.errors import XsWireError
from xentools.core.xs_wire import (
    SPECIAL_PATHS,
    FrameDecoder,
    Message,
    XsOp,
    build_directory_part_reply,
    encode,
    error_payload,
    format_perms,
    join_strings,
    parse_decimal,
    parse_perms,
    parse_write,
    path_arg,
    split_strings,
    watch_event_payload,
)
from xentools.platform.sim.xenstore_store import (
    PERM_READ,
    Caller,
    Event,
    Quotas,
    Store,
    Transaction,
    Tree,
    XsdError,
    is_child,
    perm_for,
    reply_fits,
)
from xentools.platform.sim.service import daemon_main, serve, start_service

__all__ = ["OUTPUT_LIMIT", "Quotas", "Xenstored", "domain_socket_path", "main", "run_xenstored", "spawn_xenstored"]

OUTPUT_LIMIT = 16 * 1024 * 1024  # queued reply/event bytes before a non-reading client is cut
DOMID_FIRST_RESERVED = 0x7FF0  # xen.h: DOMID_SELF and friends start here
_OK = b"OK\0"
_PRIVILEGED_OPS = frozenset(
    {XsOp.CONTROL, XsOp.INTRODUCE, XsOp.RELEASE, XsOp.IS_DOMAIN_INTRODUCED, XsOp.RESUME, XsOp.SET_TARGET}
)
_NO_TX_OPS = frozenset({XsOp.WATCH, XsOp.UNWATCH})  # XS_FLAG_NOTID: tx_id is ignored


def domain_socket_path(socket_path: str, domid: int) -> str:
    """The socket on which connections act as `domid` once it is introduced."""
    return f"{socket_path}.d{domid}"


@dataclass
class _Watch:
    path: str  # canonical: absolute or @special
    token: str
    prefix_len: int  # characters stripped from event paths (watch given as a relative path)


@dataclass
class _Connection:
    sock: socket.socket
    domid: int
    privileged: bool
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    out: bytearray = field(default_factory=bytearray)
    watches: list[_Watch] = field(default_factory=list)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    next_txid: int = 1
    closed: bool = False


@dataclass
class _Domain:
    domid: int
    mfn: int
    port: int
    listener: socket.socket
    path: str


class Xenstored:
    """The server. start() binds, serve_forever() runs until stop() (any thread or a signal
    handler), close() releases everything and removes the sockets."""

    def __init__(self, socket_path: str, quotas: Quotas | None = None, *, log: Callable[[str], None] | None = None) -> None:
        self.socket_path = socket_path
        self.store = Store(quotas)
        self.domains: dict[int, _Domain] = {}
        self.targets: dict[int, int] = {}
        self._conns: dict[int, _Connection] = {}  # keyed by id(conn) for stable identity
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._log = log or (lambda line: print(f"xenstored: {line}", file=sys.stderr, flush=True))
        self._after_reply: list[tuple[_Connection, Message]] = []
        self._handler_table = self._handlers()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._listener = self._listen(self.socket_path)
        self._sel.register(self._listener, selectors.EVENT_READ, ("listen", 0))
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))

    def _listen(self, path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(path)
                except OSError:
                    os.unlink(path)  # stale socket of a server that is gone
                else:
                    raise OSError(f"{path} is served by another process")
                finally:
                    probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def stop(self) -> None:
        """Ask serve_forever() to return; safe from another thread or a signal handler."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        while not self._stopping:
            for key, mask in self._sel.select():
                kind = key.data
                if isinstance(kind, _Connection):
                    if mask & selectors.EVENT_READ and not kind.closed:
                        self._on_readable(kind)
                    if mask & selectors.EVENT_WRITE and not kind.closed:
                        self._flush(kind)
                elif kind[0] == "listen":
                    self._accept(key.fileobj, kind[1])
                elif kind[0] == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        for domain in list(self.domains.values()):
            self._close_domain_listener(domain)
        self.domains.clear()
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._wake_r)
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- connections -----------------------------------------------------------------------

    def _accept(self, listener: socket.socket, domid: int) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._log(f"accept failed: {err}")
            return
        sock.setblocking(False)
        conn = _Connection(sock, domid=domid, privileged=(domid == 0))
        self._conns[id(conn)] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: _Connection) -> None:
        """Forget a connection: its watches and open transactions go with it."""
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(id(conn), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()
        conn.watches.clear()
        conn.transactions.clear()

    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        try:
            messages = conn.decoder.feed(data)
        except XsWireError as err:
            # Unrecoverable framing (a length beyond XENSTORE_PAYLOAD_MAX): xenstored
            # ignores such a connection; closing it is the socket equivalent.
            self._log(f"dropping domain {conn.domid} connection: {err}")
            self._drop(conn)
            return
        for msg in messages:
            if conn.closed:
                return
            self._handle(conn, msg)
        self._flush_all()

    def _send(self, conn: _Connection, msg: Message) -> None:
        if conn.closed:
            return
        conn.out += encode(msg)
        if len(conn.out) > OUTPUT_LIMIT:
            self._log(f"dropping domain {conn.domid} connection: it does not read its replies")
            self._drop(conn)

    def _flush_all(self) -> None:
        for conn in list(self._conns.values()):
            if conn.out:
                self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        while conn.out and not conn.closed:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            del conn.out[:sent]
        if conn.closed:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        self._sel.modify(conn.sock, events, conn)

    # -- dispatch --------------------------------------------------------------------------

    def _caller(self, conn: _Connection) -> Caller:
        return Caller(conn.domid, conn.privileged, self.targets.get(conn.domid))

    def _handle(self, conn: _Connection, msg: Message) -> None:
        self._after_reply = []
        try:
            payload = self._dispatch(conn, msg)
            reply = Message(msg.op, msg.req_id, msg.tx_id, reply_fits(payload))
        except XsdError as err:
            reply = Message(XsOp.ERROR, msg.req_id, msg.tx_id, error_payload(err.errno_name))
        except XsWireError:
            # Malformed arguments (missing NUL, bad number or permission string).
            reply = Message(XsOp.ERROR, msg.req_id, msg.tx_id, error_payload("EINVAL"))
        except Exception:  # noqa: BLE001 - a bug must cost one request, not every client
            self._log(f"internal error on {msg.op!r} from domain {conn.domid}:\n{traceback.format_exc()}")
            reply = Message(XsOp.ERROR, msg.req_id, msg.tx_id, error_payload("EIO"))
        # As xenstored: watch events caused by a change are queued before its reply.
        self._deliver(self.store.drain_events())
        self._send(conn, reply)
        for target, event in self._after_reply:
            self._send(target, event)
        self._after_reply = []

    def _dispatch(self, conn: _Connection, msg: Message) -> bytes:
        handler = self._handler_table.get(msg.op) if msg.known else None
        if handler is None:
            raise XsdError("ENOSYS", f"type {int(msg.op)}")
        if msg.op in _PRIVILEGED_OPS and not conn.privileged:
            raise XsdError("EACCES", f"{msg.op.name} is for dom0 only")
        tree: Tree = self.store
        if msg.op not in _NO_TX_OPS and msg.tx_id != 0:
            tx = conn.transactions.get(msg.tx_id)
            if tx is None:
                raise XsdError("ENOENT", f"no transaction {msg.tx_id}")
            tree = tx
        return handler(conn, tree, msg)

    def _handlers(self) -> dict[XsOp, Callable[[_Connection, Tree, Message], bytes]]:
        return {
            XsOp.CONTROL: self._op_control,
            XsOp.DIRECTORY: self._op_directory,
            XsOp.READ: self._op_read,
            XsOp.GET_PERMS: self._op_get_perms,
            XsOp.WATCH: self._op_watch,
            XsOp.UNWATCH: self._op_unwatch,
            XsOp.TRANSACTION_START: self._op_transaction_start,
            XsOp.TRANSACTION_END: self._op_transaction_end,
            XsOp.INTRODUCE: self._op_introduce,
            XsOp.RELEASE: self._op_release,
            XsOp.GET_DOMAIN_PATH: self._op_get_domain_path,
            XsOp.WRITE: self._op_write,
            XsOp.MKDIR: self._op_mkdir,
            XsOp.RM: self._op_rm,
            XsOp.SET_PERMS: self._op_set_perms,
            XsOp.IS_DOMAIN_INTRODUCED: self._op_is_domain_introduced,
            XsOp.RESUME: self._op_resume,
            XsOp.SET_TARGET: self._op_set_target,
            XsOp.RESET_WATCHES: self._op_reset_watches,
            XsOp.DIRECTORY_PART: self._op_directory_part,
        }

    # -- database ops ----------------------------------------------------------------------

    def _path(self, conn: _Connection, tree: Tree, raw: str, special_ok: bool = False) -> str:
        return tree.canonical(self._caller(conn), raw, special_ok=special_ok)

    def _op_read(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        path = self._path(conn, tree, path_arg(msg.payload))
        return tree.read(self._caller(conn), path)

    def _op_write(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        raw, value = parse_write(msg.payload)
        tree.write(self._caller(conn), self._path(conn, tree, raw), value)
        return _OK

    def _op_mkdir(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        tree.mkdir(self._caller(conn), self._path(conn, tree, path_arg(msg.payload)))
        return _OK

    def _op_rm(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        tree.rm(self._caller(conn), self._path(conn, tree, path_arg(msg.payload)))
        return _OK

    def _op_directory(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        path = self._path(conn, tree, path_arg(msg.payload))
        return join_strings(tree.directory(self._caller(conn), path))

    def _op_directory_part(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        args = split_strings(msg.payload)
        if len(args) != 2:
            raise XsdError("EINVAL", "DIRECTORY_PART takes <path>|<offset>|")
        node = tree.directory_node(self._caller(conn), self._path(conn, tree, args[0]))
        offset = parse_decimal(args[1], "offset")
        return build_directory_part_reply(node.generation, join_strings(node.children), offset)

    def _op_get_perms(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        path = self._path(conn, tree, path_arg(msg.payload), special_ok=True)
        return format_perms(tree.get_perms(self._caller(conn), path))

    def _op_set_perms(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        args = split_strings(msg.payload)
        if len(args) < 2:
            raise XsdError("EINVAL", "SET_PERMS takes <path>|<perm>|+")
        path = self._path(conn, tree, args[0], special_ok=True)
        tree.set_perms(self._caller(conn), path, parse_perms(args[1:]))
        return _OK

    # -- watches ---------------------------------------------------------------------------

    def _watch_args(self, conn: _Connection, msg: Message, op: str) -> tuple[str, str, str]:
        """(path as given, token, absolute path) of a WATCH or UNWATCH."""
        args = split_strings(msg.payload)
        if len(args) != 2:
            raise XsdError("EINVAL", f"{op} takes <path>|<token>|")
        raw, token = args
        return raw, token, self._path(conn, self.store, raw, special_ok=True)

    def _op_watch(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        raw, token, path = self._watch_args(conn, msg, "WATCH")
        if any(w.path == path and w.token == token for w in conn.watches):
            raise XsdError("EEXIST", f"watch {raw} {token}")
        if not conn.privileged and len(conn.watches) >= self.store.quotas.watches_per_connection:
            raise XsdError("E2BIG", "watch quota reached")  # Xen 4.17 answers E2BIG here
        relative = not raw.startswith(("/", "@"))
        watch = _Watch(path, token, len(f"/local/domain/{conn.domid}/") if relative else 0)
        conn.watches.append(watch)
        # "When a watch is first set up it is triggered once straight away" (after the ack).
        self._after_reply.append((conn, self._event_message(watch, path)))
        return _OK

    def _op_unwatch(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        raw, token, path = self._watch_args(conn, msg, "UNWATCH")
        for i, watch in enumerate(conn.watches):
            if watch.path == path and watch.token == token:
                del conn.watches[i]
                return _OK
        raise XsdError("ENOENT", f"no watch {raw} {token}")

    def _op_reset_watches(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        # "Reset all watches and transactions of the caller."
        conn.watches.clear()
        conn.transactions.clear()
        return _OK

    @staticmethod
    def _event_message(watch: _Watch, path: str) -> Message:
        return Message(XsOp.WATCH_EVENT, 0, 0, watch_event_payload(path[watch.prefix_len :], watch.token))

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            special = event.path.startswith("@")
            for conn in list(self._conns.values()):
                if not conn.watches:
                    continue
                caller = self._caller(conn)
                if not any(perm_for(caller, perms) & PERM_READ for perms in event.perms):
                    continue  # watchers learn only about nodes they may read
                for watch in conn.watches:
                    if event.exact or special:
                        match = watch.path == event.path
                    else:
                        match = not watch.path.startswith("@") and is_child(event.path, watch.path)
                    if match:
                        self._send(conn, self._event_message(watch, event.path))

    # -- transactions ----------------------------------------------------------------------

    def _op_transaction_start(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        if msg.tx_id != 0:
            raise XsdError("EBUSY", "TRANSACTION_START inside a transaction")
        if not conn.privileged and len(conn.transactions) >= self.store.quotas.transactions_per_connection:
            raise XsdError("ENOSPC", "transaction quota reached")
        txid = conn.next_txid
        while txid == 0 or txid in conn.transactions:
            txid = (txid + 1) & 0xFFFFFFFF
        conn.next_txid = (txid + 1) & 0xFFFFFFFF
        conn.transactions[txid] = self.store.start_transaction(txid)
        return f"{txid}".encode() + b"\0"

    def _op_transaction_end(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        if not isinstance(tree, Transaction):
            raise XsdError("ENOENT", "TRANSACTION_END without a transaction")
        args = split_strings(msg.payload)
        if args not in (["T"], ["F"]):
            raise XsdError("EINVAL", "TRANSACTION_END takes T| or F|")
        del conn.transactions[tree.txid]
        if args == ["T"]:
            tree.commit()
        return _OK

    # -- domains ---------------------------------------------------------------------------

    @staticmethod
    def _domid_arg(msg: Message, count: int = 1) -> list[int]:
        args = split_strings(msg.payload)
        if len(args) < count:
            raise XsdError("EINVAL", f"expected {count} argument(s)")
        return [parse_decimal(a, "domid", maximum=0xFFFF) for a in args[:count]]

    def _op_get_domain_path(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        (domid,) = self._domid_arg(msg)
        return f"/local/domain/{domid}".encode() + b"\0"

    def _op_is_domain_introduced(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        (domid,) = self._domid_arg(msg)
        return b"T\0" if domid == 0 or domid in self.domains else b"F\0"

    def _op_introduce(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        args = split_strings(msg.payload)
        if len(args) < 3:
            raise XsdError("EINVAL", "INTRODUCE takes <domid>|<mfn>|<evtchn>|")
        domid = parse_decimal(args[0], "domid", maximum=0xFFFF)
        mfn_text = args[1][1:] if args[1].startswith("-") else args[1]  # "signed decimal (!)"
        mfn = parse_decimal(mfn_text, "mfn", maximum=2**64 - 1)
        port = parse_decimal(args[2], "event channel")
        if domid == 0 or domid >= DOMID_FIRST_RESERVED:
            raise XsdError("EINVAL", f"domain {domid} cannot be introduced")
        if domid in self.domains:
            return _OK  # re-introduction (resume) keeps the existing socket
        path = domain_socket_path(self.socket_path, domid)
        try:
            listener = self._listen(path)
        except OSError as err:
            self._log(f"cannot listen on {path}: {err}")
            raise XsdError("EIO", str(err)) from None
        self.domains[domid] = _Domain(domid, mfn, port, listener, path)
        self._sel.register(listener, selectors.EVENT_READ, ("listen", domid))
        self.store.fire_special(SPECIAL_PATHS[0])
        return _OK

    def _close_domain_listener(self, domain: _Domain) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(domain.listener)
        domain.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(domain.path)

    def _op_release(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        (domid,) = self._domid_arg(msg)
        if domid == 0:
            raise XsdError("EINVAL", "dom0 cannot be released")
        domain = self.domains.pop(domid, None)
        if domain is None:
            raise XsdError("ENOENT", f"domain {domid} is not introduced")
        self._close_domain_listener(domain)
        for other in list(self._conns.values()):
            if other.domid == domid and not other.privileged:
                self._drop(other)
        self.targets.pop(domid, None)
        self.store.forget_domain(domid)
        self.store.fire_special(SPECIAL_PATHS[1])
        return _OK

    def _op_resume(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        (domid,) = self._domid_arg(msg)
        if domid not in self.domains:
            raise XsdError("ENOENT", f"domain {domid} is not introduced")
        return _OK

    def _op_set_target(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        domid, target = self._domid_arg(msg, 2)
        if domid not in self.domains:
            raise XsdError("ENOENT", f"domain {domid} is not introduced")
        self.targets[domid] = target
        return _OK

    def _op_control(self, conn: _Connection, tree: Tree, msg: Message) -> bytes:
        # The command set "is implementation specific"; a small harmless subset.
        args = split_strings(msg.payload) if msg.payload.endswith(b"\0") else []
        command = args[0] if args else ""
        if command == "help":
            return b"help\ncheck\nprint <string>\n\0"
        if command == "check":
            return _OK
        if command == "print" and len(args) >= 2:
            self._log(" ".join(args[1:]))
            return _OK
        raise XsdError("EINVAL", f"CONTROL command {command!r} not supported")


def run_xenstored(socket_path: str, *, ready_fd: int | None = None, quotas: Quotas | None = None) -> None:
    """Serve on `socket_path` in the foreground until SIGTERM or SIGINT, then remove the
    sockets and return. With `ready_fd`, writes "READY\\n" there once accepting, and closes it.
    Signal handlers are installed only when called from the main thread."""
    server = Xenstored(socket_path, quotas)
    server.start()
    serve(server, ready_fd)


def _parse_quota(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in Quotas.__dataclass_fields__ or not value.isdigit():
        fields_ = ", ".join(Quotas.__dataclass_fields__)
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER with NAME one of {fields_}")
    return name, int(value)


def main(argv: list[str] | None = None) -> int:
    def quota_argument(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--quota", type=_parse_quota, action="append", default=[], metavar="NAME=N", help="override a Quotas field"
        )

    return daemon_main(
        "xentools.platform.sim.xenstored",
        "software xenstored",
        lambda args: run_xenstored(args.socket, ready_fd=args.ready_fd, quotas=Quotas(**dict(args.quota))),
        argv,
        add_arguments=quota_argument,
    )


def spawn_xenstored(
    socket_path: str, *, quotas: Quotas | None = None, timeout: float = 10.0
) -> subprocess.Popen[bytes]:
    """Start `python -m xentools.platform.sim.xenstored` and return once it accepts
    connections (PlatformError if it does not within `timeout` seconds); its output goes to
    this process's stderr. Stop it with terminate() (SIGTERM): it removes its sockets and
    exits 0."""
    args = [f"--quota={name}={value}" for name, value in dataclasses.asdict(quotas or Quotas()).items()]
    return start_service("xenstored", "xentools.platform.sim.xenstored", socket_path, timeout=timeout, args=args).proc


if __name__ == "__main__":
    sys.exit(main())
