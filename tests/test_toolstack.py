"""toolstack.create_vbd / destroy_vbd on the software xenstored: both directories in one
transaction (repeated on EAGAIN), the right keys and permissions, and what each domain may
then read and write."""

from __future__ import annotations

import pytest

from xentools.core.features import BackendToolstackKeys, FrontendToolstackKeys
from xentools.devices.toolstack import VbdPaths, backend_path, create_vbd, destroy_vbd, frontend_path
from xentools.platform.interface import XenstoreError


class Recorder:
    """Wraps a XenstoreClient: records the tx of every call; can fail the first commits."""

    def __init__(self, xs, conflicts: int = 0) -> None:
        self.xs = xs
        self.conflicts = conflicts
        self.calls: list[tuple[str, int]] = []
        self.ends: list[bool] = []

    def transaction_start(self) -> int:
        return self.xs.transaction_start()

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        if commit and self.conflicts:
            self.conflicts -= 1
            self.xs.transaction_end(tx, commit=False)
            self.ends.append(False)
            return False
        ok = self.xs.transaction_end(tx, commit)
        self.ends.append(ok)
        return ok

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        method = getattr(self.xs, name)

        def call(path, *args):  # type: ignore[no-untyped-def]
            tx = args[-1] if args and isinstance(args[-1], int) else 0
            self.calls.append((name, tx))
            return method(path, *args)

        return call


def test_paths() -> None:
    assert backend_path(0, 3, 51712) == "/local/domain/0/backend/vbd/3/51712"
    assert frontend_path(3, 51712) == "/local/domain/3/device/vbd/51712"


def test_creates_both_directories_in_one_transaction(fresh_xen) -> None:
    xs = fresh_xen.platform(0).open_xenstore()
    rec = Recorder(xs)
    paths = create_vbd(rec, backend_domid=0, frontend_domid=1, devid=51712, params="/img", mode="r",
                       extra_backend={"discard-enable": "0"})
    assert paths == VbdPaths("/local/domain/0/backend/vbd/1/51712", "/local/domain/1/device/vbd/51712")
    txs = {tx for _, tx in rec.calls}
    assert len(txs) == 1 and 0 not in txs  # every write inside the one transaction
    assert rec.ends == [True]
    back = {k: xs.read(f"{paths.backend}/{k}").decode() for k in xs.directory(paths.backend)}
    front = {k: xs.read(f"{paths.frontend}/{k}").decode() for k in xs.directory(paths.frontend)}
    assert back["state"] == "1" and front["state"] == "1"
    keys = BackendToolstackKeys.from_keys(back)
    assert (keys.params, keys.mode, keys.frontend, keys.frontend_id, keys.online, keys.discard_enable) == (
        "/img", "r", paths.frontend, 1, True, False)
    fkeys = FrontendToolstackKeys.from_keys(front)
    assert (fkeys.backend, fkeys.backend_id, fkeys.virtual_device, fkeys.device_type) == (
        paths.backend, 0, 51712, "disk")
    for node in [paths.backend] + [f"{paths.backend}/{k}" for k in back]:
        assert xs.get_perms(node) == ["n0", "r1"], node
    for node in [paths.frontend] + [f"{paths.frontend}/{k}" for k in front]:
        assert xs.get_perms(node) == ["n1", "r0"], node
    xs.close()


def test_repeats_a_conflicting_transaction(fresh_xen) -> None:
    xs = fresh_xen.platform(0).open_xenstore()
    rec = Recorder(xs, conflicts=2)
    paths = create_vbd(rec, backend_domid=0, frontend_domid=1, devid=51728, params="/img")
    assert rec.ends == [False, False, True]
    assert xs.read(f"{paths.frontend}/virtual-device") == b"51728"
    xs.close()


def test_nothing_is_visible_before_the_commit(fresh_xen) -> None:
    xs = fresh_xen.platform(0).open_xenstore()
    watcher = fresh_xen.platform(0).open_xenstore()
    seen = []

    class Peek(Recorder):
        def transaction_end(self, tx, commit=True):  # type: ignore[no-untyped-def]
            seen.append(watcher.exists("/local/domain/0/backend/vbd/1/51712/state"))
            seen.append(watcher.exists("/local/domain/1/device/vbd/51712/state"))
            return super().transaction_end(tx, commit)

    paths = create_vbd(Peek(xs), backend_domid=0, frontend_domid=1, devid=51712, params="/img")
    assert seen == [False, False]
    assert watcher.exists(f"{paths.backend}/state") and watcher.exists(f"{paths.frontend}/state")
    xs.close()
    watcher.close()


def test_domain_access_follows_the_permissions(fresh_xen) -> None:
    xs = fresh_xen.platform(0).open_xenstore()
    paths = create_vbd(xs, backend_domid=0, frontend_domid=1, devid=51712, params="/img")
    domu = fresh_xen.platform(1).open_xenstore()
    assert domu.read(f"{paths.backend}/state") == b"1"  # the frontend reads the backend
    domu.write(f"{paths.frontend}/ring-ref", "8")  # and writes its own directory
    with pytest.raises(XenstoreError) as info:
        domu.write(f"{paths.backend}/state", "4")
    assert info.value.errno_name == "EACCES"
    domu.close()
    destroy_vbd(xs, paths)
    assert not xs.exists(paths.backend) and not xs.exists(paths.frontend)
    destroy_vbd(xs, paths)  # already gone: no error
    xs.close()


def test_existing_and_served_vbds_are_checked_inside_the_transaction(fresh_xen) -> None:
    from xentools.devices.toolstack import ToolstackError, require_domain

    xs = fresh_xen.platform(0).open_xenstore()
    try:
        common = dict(backend_domid=0, frontend_domid=1, devid=51712, params="/a.img")
        paths = create_vbd(xs, **common, existing="refuse")
        with pytest.raises(ToolstackError) as err:
            create_vbd(xs, **common, existing="refuse")
        assert err.value.rule == "vbd.exists"
        xs.write(paths.frontend + "/state", "garbage")  # not provably idle
        with pytest.raises(ToolstackError) as err:
            create_vbd(xs, **{**common, "params": "/b.img"}, existing="replace")
        assert err.value.rule == "vbd.in_use"
        assert xs.read(paths.backend + "/params") == b"/a.img"  # nothing written
        xs.write(paths.frontend + "/state", "6")
        create_vbd(xs, **{**common, "params": "/b.img"}, existing="replace")
        assert xs.read(paths.backend + "/params") == b"/b.img"
        with pytest.raises(ToolstackError) as err:
            create_vbd(xs, **{**common, "devid": 51728, "params": "/b.img", "mode": "r"}, shared_ok=False)
        assert err.value.rule == "vbd.image_shared"  # read-only beside a writable one: refused too
        require_domain(xs, 1)
        with pytest.raises(ToolstackError):
            require_domain(xs, 2)
        destroy_vbd(xs, paths)
    finally:
        xs.close()
