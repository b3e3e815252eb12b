"""Our xenstore client against Xen's own C xenstored and C tools, in dom0.

Owns: proof that xentools.platform.xenstore.XenstoreClient speaks xs_wire the way Xen's C
xenstored expects (read, write, directory, watch, transaction conflicts, permissions,
domain path) and that the C tools (xenstore-read/-write/-ls from xenstore-utils) agree with
what it wrote and read.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from xentools.platform.interface import XenstoreError

TIMEOUT = 30.0


def tool(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture
def xs(platform):
    client = platform.open_xenstore(timeout=TIMEOUT)
    yield client
    client.close()


@pytest.fixture
def base(xs):
    path = f"/local/domain/0/xentools-test-{uuid.uuid4().hex[:8]}"
    xs.mkdir(path)
    yield path
    xs.rm(path)
    assert not xs.exists(path)


def test_read_write_directory_with_the_c_tools(xs, base):
    xs.write(f"{base}/ours", "written by xentools")
    xs.write(f"{base}/empty", b"")
    assert tool("xenstore-read", f"{base}/ours") == "written by xentools\n"
    assert tool("xenstore-read", f"{base}/empty") == "\n"
    tool("xenstore-write", f"{base}/theirs", "written by xenstore-write")
    assert xs.read(f"{base}/theirs") == b"written by xenstore-write"
    assert sorted(xs.directory(base)) == ["empty", "ours", "theirs"]
    assert sorted(tool("xenstore-list", base).split()) == ["empty", "ours", "theirs"]
    with pytest.raises(XenstoreError) as info:
        xs.read(f"{base}/absent")
    assert info.value.errno_name == "ENOENT"


def test_dom0_identity_through_xenstore(xs, platform):
    assert xs.get_domain_path(0) == "/local/domain/0"
    assert xs.read("/local/domain/0/name") == b"Domain-0"
    # The domU branch of XenPlatform.domid: the relative key "domid" of our own domain.
    platform._domid = None
    assert platform.domid == 0


def test_watch_fires_for_our_write_and_for_the_c_tool(xs, base):
    xs.watch(base, "tok")
    assert xs.read_watch(timeout=TIMEOUT) == (base, "tok")  # xenstored fires once at once
    xs.write(f"{base}/a", "1")
    assert xs.read_watch(timeout=TIMEOUT) == (f"{base}/a", "tok")
    tool("xenstore-write", f"{base}/b", "2")
    assert xs.read_watch(timeout=TIMEOUT) == (f"{base}/b", "tok")
    xs.unwatch(base, "tok")
    xs.write(f"{base}/c", "3")
    assert xs.read_watch(timeout=1.0) is None


def test_transaction_commit_and_conflict(xs, base, platform):
    with xs.transaction() as tx:
        xs.write(f"{base}/x", "in-tx", tx)
        xs.write(f"{base}/y", "in-tx", tx)
        assert xs.read(f"{base}/x", tx) == b"in-tx"
        assert not xs.exists(f"{base}/x")  # invisible outside until commit
    assert tool("xenstore-read", f"{base}/y") == "in-tx\n"

    other = platform.open_xenstore(timeout=TIMEOUT)
    try:
        tx = xs.transaction_start()
        assert xs.read(f"{base}/x", tx) == b"in-tx"
        other.write(f"{base}/x", "changed")  # someone else changes what tx read
        xs.write(f"{base}/x", "stale", tx)
        assert xs.transaction_end(tx, commit=True) is False  # EAGAIN: redo the transaction
    finally:
        other.close()
    assert xs.read(f"{base}/x") == b"changed"


def test_permissions_round_trip(xs, base):
    xs.write(f"{base}/p", "v")
    xs.set_perms(f"{base}/p", ["n0", "r5"])
    assert xs.get_perms(f"{base}/p") == ["n0", "r5"]
    assert "n0,r5" in tool("xenstore-ls", "-p", base).replace(" ", "")
