"""The toolstack's part of a vbd: create and remove both xenstore directories of a device.

Owns: `create_vbd` (the keys the toolstack writes into the backend and frontend directories,
their permissions, and `state` = Initialising in both, all in ONE transaction) and
`destroy_vbd` (both directories removed in one transaction), with `VbdPaths`; the checks a
toolstack makes before attaching (the vbd exists or is being served, its image is writable
in another vbd, the frontend domain exists: `require_domain`), raising ToolstackError.
Must not: wait for either driver, start a backend, or write a key a driver owns.

Why one transaction: on real Xen the kernel drivers watch these directories and start as
soon as a `state` node appears; a directory written piecemeal is read half-made (blkback
reads `frontend` before it exists, blkfront reads `backend` before its permissions let it).
Permissions, as libxl sets them: the backend directory is owned by the backend domain and
readable by the frontend domain; the frontend directory is owned by the frontend domain and
readable by the backend domain. Every node is given its permissions explicitly, so the
result does not depend on the xenstored's inheritance rule; so is the frontend's
device/<kind>/ directory of a domU when this call makes it ("n0 r<domU>", as libxl gives
device/): a frontend in a domU must be able to list its devices.
A commit that fails with EAGAIN (another writer touched what we read) is repeated by the
platform's run_transaction.
Why a backend kind: the backend directory is /local/domain/<be>/backend/<kind>/<fe>/<devid>,
and Linux's xen-blkback, when loaded in the backend domain, claims EVERY node under
backend/vbd/ (it writes InitWait and its features there and binds the frontend's event
channel before a userspace backend can). A userspace backend beside it uses another kind, as
QEMU's does ("qdisk"); ours is USERSPACE_BACKEND_KIND. Frontends find the directory through
their `backend` key, so the kind is invisible to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import re

from xentools.core.errors import FeatureError, XentoolsError
from xentools.core.features import BackendToolstackKeys, FrontendToolstackKeys
from xentools.core.xenbus import XenbusState
from xentools.platform.interface import XenstoreError
from xentools.platform.xenstore import run_transaction

__all__ = [
    "BLKBACK_KIND", "ToolstackError", "USERSPACE_BACKEND_KIND", "VbdPaths",
    "backend_path", "create_vbd", "destroy_vbd", "frontend_path", "require_domain",
]

BLKBACK_KIND = "vbd"  # blkif's own kind: Linux xen-blkback serves every node of it
USERSPACE_BACKEND_KIND = "xtvbd"  # ours, where no kernel driver looks
# A word; short, as Linux names the backend's bus device "<kind>-<fe>-<devid>" in 20 bytes.
_KIND = re.compile(r"^[a-z][a-z0-9]{0,7}$")
# A driver that left these states is serving the vbd (or tearing it down): its directories are
# not the toolstack's to rewrite.
_IDLE_STATES = (None, XenbusState.Initialising, XenbusState.Closed)


class ToolstackError(XentoolsError):
    """The toolstack refused: the vbd exists, is being served, its image is writable in
    another vbd, or the frontend domain does not exist. `rule` is "vbd.<what>"."""

    def __init__(self, rule: str, detail: str, *, path: str | None = None) -> None:
        super().__init__(rule, detail)
        self.path = path


@dataclass(frozen=True)
class VbdPaths:
    """The two directories of one vbd."""

    backend: str
    frontend: str


def backend_path(backend_domid: int, frontend_domid: int, devid: int, kind: str = BLKBACK_KIND) -> str:
    """blkif's backend directory: /local/domain/<backend>/backend/<kind>/<frontend>/<devid>
    (kind "vbd" unless given; FeatureError "toolstack.backend_kind" if not a short word)."""
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise FeatureError("toolstack.backend_kind", f"backend kind {kind!r} is not a lowercase word of 1-8 characters")
    return f"/local/domain/{backend_domid}/backend/{kind}/{frontend_domid}/{devid}"


def frontend_path(frontend_domid: int, devid: int) -> str:
    """blkif's frontend directory: /local/domain/<frontend>/device/vbd/<devid>."""
    return f"/local/domain/{frontend_domid}/device/vbd/{devid}"


def create_vbd(
    xs,  # XenstoreClient acting as a privileged domain (dom0)
    *,
    backend_domid: int,
    frontend_domid: int,
    devid: int,
    params: str,
    mode: str = "w",
    extra_backend: Mapping[str, str] | None = None,
    frontend_dir: str | None = None,
    type: str = "file",  # noqa: A002 - the xenstore key's name
    backend_kind: str = BLKBACK_KIND,
    existing: str = "overwrite",
    shared_ok: bool = True,
) -> VbdPaths:
    """Write the toolstack keys of a vbd's backend and frontend directories in one
    transaction, `state` = 1 (Initialising) in both, and return their paths.

    Backend keys: frontend, frontend-id, params, type, mode, online=1, state, plus
    `extra_backend` (e.g. {"discard-enable": "0"}), under backend/<backend_kind>/ (pass
    USERSPACE_BACKEND_KIND for our blkback where Linux's xen-blkback is loaded). Frontend keys: backend, backend-id,
    virtual-device (= devid), device-type=disk, state. Keys are validated by
    features.BackendToolstackKeys / FrontendToolstackKeys (FeatureError when malformed).

    `existing`, checked inside the same transaction: "overwrite" writes over whatever is
    there (library callers that own the path); "refuse" raises ToolstackError "vbd.exists"
    if either directory exists; "replace" removes both first. Both refuse ("vbd.in_use") a
    vbd whose backend or frontend state is past Initialising and not Closed: a driver serves
    it, and rewriting its keys under it would change what a running backend reads.
    `shared_ok=False` refuses ("vbd.image_shared") when another vbd of the backend domain has
    the same `params` and either is writable, as xl's block script does unless given `w!`.
    """
    paths = VbdPaths(
        backend_path(backend_domid, frontend_domid, devid, backend_kind),
        frontend_dir if frontend_dir is not None else frontend_path(frontend_domid, devid),
    )
    backend_keys = BackendToolstackKeys(
        params=params, type=type, mode=mode, frontend=paths.frontend,
        frontend_id=frontend_domid, online=True,
    ).to_keys()
    if extra_backend:
        backend_keys.update({str(k): str(v) for k, v in extra_backend.items()})
    backend_keys["state"] = str(int(XenbusState.Initialising))
    frontend_keys = FrontendToolstackKeys(
        backend=paths.backend, backend_id=backend_domid, virtual_device=devid,
    ).to_keys()
    frontend_keys.setdefault("device-type", "disk")
    frontend_keys["state"] = str(int(XenbusState.Initialising))
    backend_perms = [f"n{backend_domid}", f"r{frontend_domid}"]
    frontend_perms = [f"n{frontend_domid}", f"r{backend_domid}"]

    # A domU lists its own device/<kind>/ (doctor does; Linux's xenbus does to find its
    # devices): made here when absent, it would inherit its parent's permissions, which need
    # not let the domU read. libxl gives /local/domain/<fe>/device "n0 r<fe>"; so do we.
    device_dir = f"/local/domain/{frontend_domid}/device/"
    kind_dir = paths.frontend.rsplit("/", 1)[0] if paths.frontend.startswith(device_dir) else None

    def work(tx: int) -> None:
        if existing != "overwrite":
            _check_existing(xs, tx, paths, replace=existing == "replace")
        if not shared_ok:
            _check_shared(xs, tx, backend_domid, paths.backend, params, mode)
        if kind_dir is not None and frontend_domid != 0 and not xs.exists(kind_dir, tx):
            xs.mkdir(kind_dir, tx)
            xs.set_perms(kind_dir, ["n0", f"r{frontend_domid}"], tx)
        for directory, keys, perms in (
            (paths.backend, backend_keys, backend_perms),
            (paths.frontend, frontend_keys, frontend_perms),
        ):
            xs.mkdir(directory, tx)
            xs.set_perms(directory, perms, tx)
            for key, value in keys.items():
                node = f"{directory}/{key}"
                xs.write(node, value, tx)
                xs.set_perms(node, perms, tx)

    if existing not in ("overwrite", "refuse", "replace"):
        raise ValueError(f"existing={existing!r}")
    run_transaction(xs, work, what=f"creating {paths.backend} and {paths.frontend}")
    return paths


def _read(xs, path: str, tx: int) -> str | None:  # type: ignore[no-untyped-def]
    try:
        return xs.read(path, tx).decode(errors="replace")
    except XenstoreError as err:
        if err.errno_name == "ENOENT":
            return None
        raise


def _list(xs, path: str, tx: int) -> list[str]:  # type: ignore[no-untyped-def]
    try:
        return xs.directory(path, tx)
    except XenstoreError as err:
        if err.errno_name == "ENOENT":
            return []
        raise


def _check_existing(xs, tx: int, paths: VbdPaths, *, replace: bool) -> None:  # type: ignore[no-untyped-def]
    found = [d for d in (paths.backend, paths.frontend) if xs.exists(d, tx)]
    if not found:
        return
    for directory in found:
        raw = _read(xs, f"{directory}/state", tx)
        state = None
        if raw is not None:
            try:
                state = XenbusState(int(raw))
            except ValueError:
                state = raw  # garbage: not provably idle
        if state not in _IDLE_STATES:
            name = state.name if isinstance(state, XenbusState) else repr(state)
            raise ToolstackError("vbd.in_use", f"{directory} is in state {name}: a driver is serving it",
                                 path=paths.backend)
    if not replace:
        raise ToolstackError("vbd.exists", f"{found[0]} exists already", path=paths.backend)
    for directory in found:
        xs.rm(directory, tx)


def _check_shared(xs, tx: int, backend_domid: int, own: str, params: str, mode: str) -> None:  # type: ignore[no-untyped-def]
    root = f"/local/domain/{backend_domid}/backend"
    for kind in _list(xs, root, tx):
        for fe in _list(xs, f"{root}/{kind}", tx):
            for dev in _list(xs, f"{root}/{kind}/{fe}", tx):
                other = f"{root}/{kind}/{fe}/{dev}"
                if other == own or _read(xs, f"{other}/params", tx) != params:
                    continue
                other_mode = _read(xs, f"{other}/mode", tx) or "w"
                if "w" in mode or "w" in other_mode:
                    raise ToolstackError("vbd.image_shared", f"{params} is already on vbd {other} (mode "
                                         f"{other_mode}); writable twice it would be corrupted", path=other)


def require_domain(xs, domid: int) -> None:  # type: ignore[no-untyped-def]
    """ToolstackError "vbd.no_domain" unless domain `domid` exists: its /local/domain/<domid>
    is there and, for a domU, xenstored knows it as introduced (on real Xen libxl does both
    when it builds a domain; on the software Xen, `sim start --domid N` or add_domain())."""
    if not xs.exists(f"/local/domain/{domid}"):
        raise ToolstackError("vbd.no_domain", f"domain {domid} does not exist (no /local/domain/{domid})")
    try:
        introduced = domid == 0 or xs.is_introduced(domid)
    except XenstoreError as err:
        if err.errno_name not in ("EACCES", "EPERM"):
            raise
        introduced = True  # an unprivileged caller cannot ask; the directory has to do
    if not introduced:
        raise ToolstackError("vbd.no_domain", f"domain {domid} is not introduced to xenstored")



def destroy_vbd(xs, paths: VbdPaths) -> None:  # type: ignore[no-untyped-def]
    """Remove both directories in one transaction (a missing one is not an error)."""

    def work(tx: int) -> None:
        for directory in (paths.frontend, paths.backend):
            try:
                xs.rm(directory, tx)
            except XenstoreError as err:
                if err.errno_name != "ENOENT":
                    raise

    run_transaction(xs, work, what=f"removing {paths.backend} and {paths.frontend}")
