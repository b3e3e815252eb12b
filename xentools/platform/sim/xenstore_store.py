"""The node tree of the software xenstored: nodes, permissions, quotas and transactions.

Owns: the database semantics of docs/misc/xenstore.txt and xenstored_core.c as seen by a
client: path canonicalisation, Xen's permission rules, node creation with inherited
permissions, recursive removal, generation counts, transactions with conflict detection, and
the list of watch events each change produces.
Must not: touch sockets or files, know about connections or frames (xenstored.py does), or
decide who receives a watch event (it only says which path changed and under which perms).

Permissions follow xenstored's perm_for_conn(): a privileged caller (dom0) and the owner
(first entry) get read, write and owner rights; otherwise the first later entry naming the
caller's domain (or the domain it targets, SET_TARGET) decides; otherwise the owner entry's
letter is the access for everyone else. A node that does not exist answers ENOENT only if
the nearest existing ancestor would grant the access asked for, else EACCES, so that a domain
learns nothing about nodes it may not see (errno_from_parents()).

Transactions take a snapshot of the tree at TRANSACTION_START. Every node a transaction
reads or writes (and every ancestor it looks at) is remembered; the commit fails with EAGAIN
if any of them is no longer the very node object of the snapshot (nodes are immutable and
replaced on every change, each with a fresh generation count). Watch events of a transaction
are held back until it commits.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, replace

from xentools.core.errors import XentoolsError, XsWireError
from xentools.core.xs_wire import ABS_PATH_MAX, PAYLOAD_MAX, SPECIAL_PATHS, Perm, validate_path

PERM_READ = 1
PERM_WRITE = 2
PERM_OWNER = 4
_ALL = PERM_READ | PERM_WRITE | PERM_OWNER


class XsdError(XentoolsError):
    """A request the software xenstored refuses; `errno_name` is the xsd_errors name sent back
    in the XS_ERROR reply (for example "ENOENT")."""

    def __init__(self, errno_name: str, detail: str = "") -> None:
        super().__init__(f"{errno_name}: {detail}" if detail else errno_name)
        self.errno_name = errno_name


@dataclass(frozen=True)
class Quotas:
    """Limits for unprivileged domains (dom0 has none), defaults as xenstored's.

    entries_per_domain: nodes a domain may own (-E, "nodes", 1000), ENOSPC.
    node_size: bytes of value plus child names of one node (-S, "node-size", 2048), ENOSPC.
    watches_per_connection: (-W, "watches", 128), E2BIG as in Xen 4.17.
    transactions_per_connection: (-t, "transactions", 10), ENOSPC.
    perms_per_node: entries in one SET_PERMS (-A, "node-permissions", 5), ENOSPC.
    path_length: length of a path below /local/domain/<id>/ (-M, "path-length",
    XENSTORE_REL_PATH_MAX), EINVAL.
    """

    entries_per_domain: int = 1000
    node_size: int = 2048
    watches_per_connection: int = 128
    transactions_per_connection: int = 10
    perms_per_node: int = 5
    path_length: int = 2048


@dataclass(frozen=True)
class Caller:
    """Who sends a request: the domain of its connection, and whether it is privileged."""

    domid: int
    privileged: bool
    target: int | None = None  # set by SET_TARGET: acts with the rights of this domain too


@dataclass(frozen=True)
class Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...]
    generation: int

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def size(self) -> int:
        """What the node-size quota counts: value plus NUL-terminated child names."""
        return len(self.value) + sum(len(c) + 1 for c in self.children)


@dataclass(frozen=True)
class Event:
    """A change at `path`. exact: only watches on exactly this path match (descendants
    removed by a recursive RM). perms: the node's permissions before and/or after the
    change; a watcher must be able to read under one of them to be told."""

    path: str
    exact: bool
    perms: tuple[tuple[Perm, ...], ...]


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def basename_of(path: str) -> str:
    return path.rsplit("/", 1)[1]


def child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def is_child(path: str, ancestor: str) -> bool:
    """xenstored's is_child(): `path` is `ancestor` or below it ("/" is above every path)."""
    if ancestor == "/":
        return path.startswith("/")
    return path == ancestor or path.startswith(ancestor + "/")


def perm_for(caller: Caller, perms: tuple[Perm, ...]) -> int:
    """xenstored's perm_for_conn(): the rights `caller` has on a node with `perms`."""
    owner = perms[0].domid
    if caller.privileged or owner == caller.domid or (caller.target is not None and owner == caller.target):
        return _ALL
    for perm in perms[1:]:
        if perm.domid == caller.domid or (caller.target is not None and perm.domid == caller.target):
            return _bits(perm)
    return _bits(perms[0])


def _bits(perm: Perm) -> int:
    return (PERM_READ if perm.read else 0) | (PERM_WRITE if perm.write else 0)


_LOCAL_PREFIX = re.compile(r"/local/domain/[0-9]{1,5}/")


class Tree:
    """Operations on a set of nodes; the live Store and each Transaction are Trees."""

    def __init__(self, quotas: Quotas, generations: itertools.count) -> None:
        self.quotas = quotas
        self._generations = generations
        self.events: list[Event] = []

    # -- storage primitives, specialised by Store and Transaction --------------------------

    def get(self, path: str) -> Node | None:
        raise NotImplementedError

    def _set(self, path: str, node: Node | None) -> None:
        raise NotImplementedError

    def owned(self, domid: int) -> int:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------

    def _gen(self) -> int:
        return next(self._generations)

    def canonical(self, caller: Caller, raw: str, *, special_ok: bool = False) -> str:
        """Absolute form of a request path (relative paths are below the caller's
        /local/domain/<domid>); EINVAL if it breaks the path rules or the length quota."""
        try:
            validate_path(raw, relative_ok=True, special_ok=special_ok)
        except XsWireError as err:
            raise XsdError("EINVAL", err.detail) from None
        if raw.startswith("@"):
            return raw
        path = raw if raw.startswith("/") else f"/local/domain/{caller.domid}/{raw}"
        if len(path) > ABS_PATH_MAX:
            raise XsdError("EINVAL", f"path of {len(path)} bytes > {ABS_PATH_MAX}")
        if not caller.privileged:
            # canonicalize(): the path-length quota counts below /local/domain/<id>/.
            match = _LOCAL_PREFIX.match(path)
            rest = len(path) - (match.end() if match else 0)
            if rest > self.quotas.path_length:
                raise XsdError("EINVAL", f"path longer than the quota {self.quotas.path_length}")
        return path

    def _nearest_ancestor(self, path: str) -> Node:
        while path != "/":
            path = parent_of(path)
            node = self.get(path)
            if node is not None:
                return node
        node = self.get("/")
        assert node is not None, "the root node always exists"
        return node

    def checked(self, caller: Caller, path: str, need: int) -> Node:
        """The node at `path` if `caller` has every right in `need`; EACCES or ENOENT."""
        node = self.get(path)
        if node is not None:
            if perm_for(caller, node.perms) & need != need:
                raise XsdError("EACCES", path)
            return node
        if path.startswith("@"):
            raise XsdError("ENOENT", path)
        # errno_from_parents(): say ENOENT only to a caller the parents would let in.
        if perm_for(caller, self._nearest_ancestor(path).perms) & need:
            raise XsdError("ENOENT", path)
        raise XsdError("EACCES", path)

    def _checked_or_none(self, caller: Caller, path: str, need: int) -> Node | None:
        try:
            return self.checked(caller, path, need)
        except XsdError as err:
            if err.errno_name == "ENOENT":
                return None
            raise

    def _put(self, caller: Caller, path: str, node: Node) -> None:
        if not caller.privileged and node.size() > self.quotas.node_size:
            raise XsdError("ENOSPC", f"node {path} would be {node.size()} bytes")
        self._set(path, node)

    def _fire(self, path: str, exact: bool, *perms: tuple[Perm, ...]) -> None:
        self.events.append(Event(path, exact, tuple(perms)))

    # -- requests --------------------------------------------------------------------------

    def read(self, caller: Caller, path: str) -> bytes:
        return self.checked(caller, path, PERM_READ).value

    def directory(self, caller: Caller, path: str) -> tuple[str, ...]:
        return self.checked(caller, path, PERM_READ).children

    def directory_node(self, caller: Caller, path: str) -> Node:
        return self.checked(caller, path, PERM_READ)

    def get_perms(self, caller: Caller, path: str) -> tuple[Perm, ...]:
        return self.checked(caller, path, PERM_READ).perms

    def write(self, caller: Caller, path: str, value: bytes) -> None:
        node = self._checked_or_none(caller, path, PERM_WRITE)
        if node is None:
            node = self._create(caller, path, value)
        else:
            node = replace(node, value=value, generation=self._gen())
            self._put(caller, path, node)
        self._fire(path, False, node.perms)

    def mkdir(self, caller: Caller, path: str) -> None:
        if self._checked_or_none(caller, path, PERM_WRITE) is None:
            node = self._create(caller, path, b"")
            self._fire(path, False, node.perms)

    def _create(self, caller: Caller, path: str, value: bytes) -> Node:
        """Create `path` and its missing parents; new nodes inherit their parent's
        permissions, and an unprivileged creator becomes their owner (construct_node())."""
        missing = []
        cursor = path
        while self.get(cursor) is None:
            missing.append(cursor)
            cursor = parent_of(cursor)
        if not caller.privileged:
            have = self.owned(caller.domid)
            if have + len(missing) > self.quotas.entries_per_domain:
                raise XsdError(
                    "ENOSPC",
                    f"domain {caller.domid} owns {have} nodes, quota {self.quotas.entries_per_domain}",
                )
        parent = self.get(cursor)
        assert parent is not None
        # Check every size first so that a refused request leaves nothing half done.
        if not caller.privileged and len(value) > self.quotas.node_size:
            raise XsdError("ENOSPC", f"value of {len(value)} bytes > quota {self.quotas.node_size}")
        node = parent
        for name in reversed(missing):
            grown = replace(
                parent,
                children=parent.children + (basename_of(name),),
                generation=self._gen(),
            )
            self._put(caller, parent_of(name), grown)
            perms = parent.perms
            if not caller.privileged:
                perms = (Perm(perms[0].access, caller.domid),) + perms[1:]
            node = Node(
                value=value if name == path else b"",
                perms=perms,
                children=(),
                generation=self._gen(),
            )
            self._put(caller, name, node)
            parent = node
        return node

    def rm(self, caller: Caller, path: str) -> None:
        node = self._checked_or_none(caller, path, PERM_WRITE)
        if node is None:
            # "It is not an error if <path> does not exist, but it _is_ an error if
            # <path>'s immediate parent does not exist either."
            if path != "/" and self.get(parent_of(path)) is not None:
                return
            raise XsdError("ENOENT", path)
        if path == "/":
            raise XsdError("EINVAL", "cannot remove the root")
        self._remove_subtree(path, node, root=path)
        parent_path = parent_of(path)
        parent = self.get(parent_path)
        assert parent is not None
        name = basename_of(path)
        self._set(
            parent_path,
            replace(
                parent,
                children=tuple(c for c in parent.children if c != name),
                generation=self._gen(),
            ),
        )

    def _remove_subtree(self, path: str, node: Node, root: str) -> None:
        for name in node.children:
            sub = child_path(path, name)
            subnode = self.get(sub)
            if subnode is not None:
                self._remove_subtree(sub, subnode, root)
        self._set(path, None)
        # delnode_sub(): descendants fire only watches set exactly on them.
        self._fire(path, path != root, node.perms)

    def set_perms(self, caller: Caller, path: str, perms: tuple[Perm, ...]) -> None:
        if not caller.privileged and len(perms) > self.quotas.perms_per_node:
            raise XsdError("ENOSPC", f"{len(perms)} permissions > quota {self.quotas.perms_per_node}")
        node = self.checked(caller, path, PERM_WRITE | PERM_OWNER)
        if not caller.privileged and perms[0].domid != node.owner:
            raise XsdError("EPERM", "an unprivileged domain may not change the owner")
        new = replace(node, perms=perms, generation=self._gen())
        self._put(caller, path, new)
        self._fire(path, False, node.perms, new.perms)


class Store(Tree):
    """The live tree. Starts like xenstored's setup_structure(): /, /tool, /tool/xenstored
    and the special nodes, all owned by dom0 with no access for others."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        super().__init__(quotas or Quotas(), itertools.count(1))
        self.nodes: dict[str, Node] = {}
        self._owned: Counter[int] = Counter()
        none0 = (Perm("n", 0),)
        self._set("/", Node(b"", none0, ("tool",), self._gen()))
        self._set("/tool", Node(b"", none0, ("xenstored",), self._gen()))
        self._set("/tool/xenstored", Node(b"", none0, (), self._gen()))
        for special in SPECIAL_PATHS:
            self._set(special, Node(b"", none0, (), self._gen()))

    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def _set(self, path: str, node: Node | None) -> None:
        old = self.nodes.get(path)
        if old is not None:
            self._owned[old.owner] -= 1
        if node is None:
            self.nodes.pop(path, None)
        else:
            self.nodes[path] = node
            self._owned[node.owner] += 1

    def owned(self, domid: int) -> int:
        return self._owned[domid]

    def drain_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def fire_special(self, special: str) -> None:
        node = self.nodes[special]
        self._fire(special, False, node.perms)

    def forget_domain(self, domid: int) -> None:
        """A released domain leaves no rights behind (XSA-322): nodes it owned pass to dom0
        and entries naming it are dropped, so a later domain reusing the id gains nothing."""
        for path, node in list(self.nodes.items()):
            if all(p.domid != domid for p in node.perms):
                continue
            owner = node.perms[0]
            if owner.domid == domid:
                owner = Perm(owner.access, 0)
            rest = tuple(p for p in node.perms[1:] if p.domid != domid)
            self._set(path, replace(node, perms=(owner,) + rest, generation=self._gen()))

    def start_transaction(self, txid: int) -> Transaction:
        return Transaction(self, txid)


class Transaction(Tree):
    """A snapshot of the Store with private changes; see the module docstring."""

    def __init__(self, store: Store, txid: int) -> None:
        super().__init__(store.quotas, store._generations)
        self.txid = txid
        self._store = store
        self._snapshot = dict(store.nodes)
        self._overlay: dict[str, Node | None] = {}
        self._owned: Counter[int] = Counter(store._owned)
        self._touched: set[str] = set()

    def get(self, path: str) -> Node | None:
        self._touched.add(path)
        if path in self._overlay:
            return self._overlay[path]
        return self._snapshot.get(path)

    def _set(self, path: str, node: Node | None) -> None:
        self._touched.add(path)
        old = self.get(path)
        if old is not None:
            self._owned[old.owner] -= 1
        if node is not None:
            self._owned[node.owner] += 1
        self._overlay[path] = node

    def owned(self, domid: int) -> int:
        return self._owned[domid]

    def commit(self) -> None:
        """Apply to the Store, or raise XsdError("EAGAIN") if another change touched any
        node this transaction looked at since it started."""
        live = self._store.nodes
        for path in self._touched:
            if live.get(path) is not self._snapshot.get(path):
                raise XsdError("EAGAIN", f"{path} changed since the transaction started")
        for path, node in self._overlay.items():
            self._store._set(path, node)
        self._store.events.extend(self.events)
        self.events = []


def reply_fits(payload: bytes) -> bytes:
    """send_reply(): a reply longer than XENSTORE_PAYLOAD_MAX becomes E2BIG."""
    if len(payload) > PAYLOAD_MAX:
        raise XsdError("E2BIG", f"reply of {len(payload)} bytes")
    return payload
