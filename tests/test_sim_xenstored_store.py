"""The software xenstored's node tree, without sockets: permissions, quotas, transactions."""

from __future__ import annotations

import pytest

from xentools.core.xs_wire import Perm, parse_perms
from xentools.platform.sim.xenstore_store import Caller, Quotas, Store, XsdError, perm_for

DOM0 = Caller(0, privileged=True)
DOM3 = Caller(3, privileged=False)
DOM4 = Caller(4, privileged=False)


def errno_name(call) -> str:
    with pytest.raises(XsdError) as exc:
        call()
    return exc.value.errno_name


def perms(*texts: str) -> tuple[Perm, ...]:
    return parse_perms(list(texts))


def test_initial_tree_like_xenstored():
    store = Store()
    assert store.directory(DOM0, "/") == ("tool",)
    assert store.directory(DOM0, "/tool") == ("xenstored",)
    assert store.get_perms(DOM0, "@introduceDomain") == perms("n0")
    assert errno_name(lambda: store.read(DOM3, "/tool")) == "EACCES"


def test_perm_for_follows_perm_for_conn():
    p = perms("r3", "w4", "n5")
    assert perm_for(DOM0, p) == 7  # privileged: everything
    assert perm_for(DOM3, p) == 7  # owner: everything, whatever its letter
    assert perm_for(DOM4, p) == 2  # its own entry: write only
    assert perm_for(Caller(5, False), p) == 0
    assert perm_for(Caller(6, False), p) == 1  # not listed: the owner's letter
    assert perm_for(Caller(6, False, target=4), p) == 2  # acts with its target's entry
    assert perm_for(Caller(6, False, target=3), p) == 7  # targets the owner


def test_write_creates_parents_inheriting_perms():
    store = Store()
    store.write(DOM0, "/local/domain/3", b"")
    store.set_perms(DOM0, "/local/domain/3", perms("n3", "r0", "b7"))
    store.write(DOM3, "/local/domain/3/a/b/c", b"v")
    for path in ("/local/domain/3/a", "/local/domain/3/a/b", "/local/domain/3/a/b/c"):
        assert store.get_perms(DOM0, path) == perms("n3", "r0", "b7")
    assert store.read(DOM0, "/local/domain/3/a/b") == b""
    assert store.read(Caller(7, False), "/local/domain/3/a/b/c") == b"v"
    # a privileged creator keeps the parent's owner
    store.write(DOM0, "/local/domain/3/x/y", b"")
    assert store.get_perms(DOM0, "/local/domain/3/x/y")[0] == Perm("n", 3)


def test_enoent_only_when_parents_would_allow():
    store = Store()
    store.write(DOM0, "/open", b"")
    store.set_perms(DOM0, "/open", perms("r0"))  # everybody may read
    store.write(DOM0, "/closed", b"")
    assert errno_name(lambda: store.read(DOM3, "/open/missing")) == "ENOENT"
    assert errno_name(lambda: store.read(DOM3, "/closed/missing/deeper")) == "EACCES"
    assert errno_name(lambda: store.write(DOM3, "/open/new", b"")) == "EACCES"  # read-only
    assert errno_name(lambda: store.rm(DOM3, "/open")) == "EACCES"


def test_rm_semantics_and_events():
    store = Store()
    store.write(DOM0, "/r/a/b", b"")
    store.drain_events()
    store.rm(DOM0, "/r/missing")  # parent exists: fine, nothing happens
    assert store.drain_events() == []
    assert errno_name(lambda: store.rm(DOM0, "/r/missing/child")) == "ENOENT"
    assert errno_name(lambda: store.rm(DOM0, "/")) == "EINVAL"
    store.rm(DOM0, "/r/a")
    events = store.drain_events()
    assert [(e.path, e.exact) for e in events] == [("/r/a/b", True), ("/r/a", False)]
    assert store.directory(DOM0, "/r") == ()


def test_set_perms_rules():
    store = Store()
    store.write(DOM0, "/local/domain/3", b"")
    store.set_perms(DOM0, "/local/domain/3", perms("b3"))
    store.write(DOM3, "/local/domain/3/own", b"")
    store.set_perms(DOM3, "/local/domain/3/own", perms("n3", "r4"))
    assert errno_name(lambda: store.set_perms(DOM3, "/local/domain/3/own", perms("n4"))) == "EPERM"
    store.write(DOM0, "/local/domain/3/dom0s", b"")
    store.set_perms(DOM0, "/local/domain/3/dom0s", perms("b0"))  # everybody may write...
    store.write(DOM3, "/local/domain/3/dom0s", b"w")
    assert errno_name(lambda: store.set_perms(DOM3, "/local/domain/3/dom0s", perms("n0"))) == "EACCES"


def test_quotas_apply_to_unprivileged_only():
    store = Store(Quotas(entries_per_domain=3, node_size=10, perms_per_node=2, path_length=20))
    store.write(DOM0, "/local/domain/3", b"")
    store.set_perms(DOM0, "/local/domain/3", perms("n3"))
    store.write(DOM3, "/local/domain/3/a", b"")
    store.write(DOM3, "/local/domain/3/b", b"")
    assert errno_name(lambda: store.write(DOM3, "/local/domain/3/c/d", b"")) == "ENOSPC"
    assert not store.nodes.get("/local/domain/3/c")  # nothing half done
    assert errno_name(lambda: store.write(DOM3, "/local/domain/3/a", b"x" * 11)) == "ENOSPC"
    assert errno_name(lambda: store.set_perms(DOM3, "/local/domain/3/a", perms("n3", "r1", "r2"))) == "ENOSPC"
    assert errno_name(lambda: store.canonical(DOM3, "x" * 21)) == "EINVAL"
    assert store.canonical(DOM3, "x" * 20) == "/local/domain/3/" + "x" * 20
    store.write(DOM0, "/big", b"x" * 100)  # dom0: no quota


def test_transaction_snapshot_and_conflicts():
    store = Store()
    store.write(DOM0, "/t/a", b"1")
    store.write(DOM0, "/t/b", b"1")
    tx = store.start_transaction(1)
    assert tx.read(DOM0, "/t/a") == b"1"
    tx.write(DOM0, "/t/c", b"new")
    store.write(DOM0, "/t/b", b"2")  # not touched by tx
    assert store.nodes.get("/t/c") is None
    tx.commit()
    assert store.read(DOM0, "/t/c") == b"new"
    tx = store.start_transaction(2)
    tx.read(DOM0, "/t/a")
    store.write(DOM0, "/t/a", b"3")
    tx.write(DOM0, "/t/d", b"x")
    assert errno_name(tx.commit) == "EAGAIN"
    assert store.nodes.get("/t/d") is None
    # A node that did not exist when read, created meanwhile by someone else, conflicts too.
    tx = store.start_transaction(3)
    assert errno_name(lambda: tx.read(DOM0, "/t/later")) == "ENOENT"
    store.write(DOM0, "/t/later", b"")
    assert errno_name(tx.commit) == "EAGAIN"


def test_transaction_events_only_on_commit():
    store = Store()
    store.drain_events()
    tx = store.start_transaction(1)
    tx.write(DOM0, "/e/x", b"")
    assert store.drain_events() == []
    tx.commit()
    assert [e.path for e in store.drain_events()] == ["/e/x"]


def test_directory_generation_changes_with_children():
    store = Store()
    store.mkdir(DOM0, "/g")
    before = store.directory_node(DOM0, "/g").generation
    store.write(DOM0, "/g/child", b"")
    after = store.directory_node(DOM0, "/g").generation
    store.write(DOM0, "/g/child", b"value")  # the parent itself is unchanged
    assert before != after == store.directory_node(DOM0, "/g").generation


def test_forget_domain_leaves_no_rights_xsa322():
    store = Store()
    store.write(DOM0, "/local/domain/3", b"")
    store.set_perms(DOM0, "/local/domain/3", perms("b3", "r4"))
    store.write(DOM0, "/shared", b"")
    store.set_perms(DOM0, "/shared", perms("n0", "b3"))
    store.forget_domain(3)
    assert store.get_perms(DOM0, "/local/domain/3") == perms("b0", "r4")
    assert store.get_perms(DOM0, "/shared") == perms("n0")
    assert errno_name(lambda: store.read(DOM3, "/shared")) == "EACCES"
