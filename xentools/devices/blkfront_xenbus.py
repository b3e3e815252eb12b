"""blkfront's xenstore side: finding the device, reading the backend, writing our keys.

Owns: resolving a `--vbd` argument to a frontend directory, reading the toolstack keys and
the backend's records (`BackendFeatures`, `DiskInfo`) from xenstore, writing our
`FrontendRingInfo` in one transaction (run_transaction repeats it on EAGAIN), writing our state, and
`BackendStateWatch` (a watch on the backend's `state` node with deadlines).
Must not: decide transitions (xentools.core.xenbus.Handshake does) or touch rings and grants.

Every value read from xenstore is hostile until parsed by xentools.core.features (strict
decimal, bounds); a bad one raises FeatureError, which the device reports as one line.
"""

from __future__ import annotations

import time

from xentools.core.errors import FeatureError, VbdError
from xentools.core.features import BackendFeatures, DiskInfo, FrontendRingInfo, FrontendToolstackKeys
from xentools.core.vbd import encode_vbd
from xentools.core.xenbus import XenbusState, parse_state
from xentools.devices.blkfront_types import BlkfrontError, ConnectTimeout
from xentools.platform.interface import XenstoreError
from xentools.platform.xenstore import run_transaction

__all__ = [
    "BackendStateWatch",
    "backend_error",
    "frontend_path_for",
    "read_backend_features",
    "read_disk_info",
    "read_keys",
    "read_toolstack",
    "write_ring_info",
    "write_state",
]

# Keys of the backend directory the frontend reads (BackendFeatures and DiskInfo).
_BACKEND_KEYS = (
    "feature-flush-cache", "feature-barrier", "feature-discard", "discard-granularity",
    "discard-alignment", "discard-secure", "feature-persistent", "feature-max-indirect-segments",
    "max-ring-page-order", "multi-queue-max-queues",
)
_DISK_KEYS = ("sectors", "info", "sector-size", "physical-sector-size")
_TOOLSTACK_KEYS = ("backend", "backend-id", "virtual-device", "device-type", "trusted")
# Transport keys a previous connection may have left in our directory.
_RING_KEYS = ("ring-ref", "ring-page-order", "multi-queue-num-queues", "event-channel", "protocol")


def frontend_path_for(domid: int, vbd: str | int) -> str:
    """The frontend directory of `vbd` in domain `domid`.

    `vbd` is a disk name (xvda, sda, hda, d0p1: xen-vbd-interface(7)), a decimal
    virtual-device number (51712), or an absolute frontend path (returned as given).
    Raises BlkfrontError "vbd.spec" for anything else.
    """
    if isinstance(vbd, int) and not isinstance(vbd, bool):
        number = vbd
    elif isinstance(vbd, str) and vbd.startswith("/"):
        if "//" in vbd or vbd.endswith("/") or " " in vbd:
            raise BlkfrontError("vbd.spec", f"{vbd!r} is not a xenstore path")
        return vbd
    elif isinstance(vbd, str):
        try:
            number = encode_vbd(vbd)
        except VbdError as err:
            raise BlkfrontError("vbd.spec", f"cannot parse disk {vbd!r}: {err}") from None
    else:
        raise BlkfrontError("vbd.spec", f"{vbd!r} is not a disk name, number or path")
    return f"/local/domain/{domid}/device/vbd/{number}"


def read_keys(xs, directory: str, keys: tuple[str, ...]) -> dict[str, bytes]:
    """The values of those of `keys` present under `directory` (absent ones left out)."""
    try:
        present = set(xs.directory(directory))
    except XenstoreError as err:
        if err.errno_name == "ENOENT":
            raise BlkfrontError("xenstore.missing", f"{directory} does not exist") from None
        raise
    out: dict[str, bytes] = {}
    for key in keys:
        if key in present:
            try:
                out[key] = xs.read(f"{directory}/{key}")
            except XenstoreError as err:
                if err.errno_name != "ENOENT":  # removed meanwhile: absent
                    raise
    return out


def read_toolstack(xs, frontend_path: str) -> FrontendToolstackKeys:
    """The toolstack's keys of our directory (backend path, backend-id, virtual-device)."""
    return FrontendToolstackKeys.from_keys(read_keys(xs, frontend_path, _TOOLSTACK_KEYS))


def read_backend_features(xs, backend_path: str) -> BackendFeatures:
    return BackendFeatures.from_keys(read_keys(xs, backend_path, _BACKEND_KEYS))


def read_disk_info(xs, backend_path: str) -> DiskInfo:
    return DiskInfo.from_keys(read_keys(xs, backend_path, _DISK_KEYS))


def write_state(xs, path: str, state: XenbusState) -> None:
    xs.write(f"{path}/state", str(int(state)))


def write_ring_info(xs, frontend_path: str, info: FrontendRingInfo) -> None:
    """Write `info` in one transaction, removing transport keys of an earlier connection
    (a stale multi-queue-num-queues would point the backend at stale queue-K dirs)."""
    keys = info.to_keys()

    def work(tx: int) -> None:
        for name in xs.directory(frontend_path, tx):
            stale = name in _RING_KEYS or name.startswith("queue-") or (
                name.startswith("ring-ref") and name[8:].isdigit()
            )
            if stale and name not in keys:
                xs.rm(f"{frontend_path}/{name}", tx)
        for key, value in keys.items():
            xs.write(f"{frontend_path}/{key}", value, tx)

    try:
        run_transaction(xs, work, what=f"writing {frontend_path}")
    except XenstoreError as err:
        if err.errno_name != "EAGAIN":
            raise
        raise BlkfrontError("xenstore.transaction", f"writing {frontend_path} kept conflicting (EAGAIN)") from None


class BackendStateWatch:
    """A watch on `<backend>/state`: `wait_change(deadline)` returns the state after the
    next event (or the current state at the first call: xenstored fires a new watch once).
    A malformed state value raises FeatureError ("state.malformed"/"state.unknown")."""

    def __init__(self, xs, backend_path: str, token: str) -> None:
        self.xs = xs
        self.path = f"{backend_path}/state"
        self.token = token
        self.last: XenbusState = XenbusState.Unknown
        self.last_raw: bytes | None = None
        xs.watch(self.path, token)

    def read(self) -> XenbusState:
        try:
            raw: bytes | None = self.xs.read(self.path)
        except XenstoreError as err:
            if err.errno_name != "ENOENT":
                raise
            raw = None
        self.last_raw = raw
        self.last = parse_state(raw)
        return self.last

    def drain(self) -> bool:
        """Take every queued event of this watch without waiting; True if there was one."""
        seen = False
        while True:
            event = self.xs.read_watch(0)
            if event is None:
                return seen
            seen = seen or event[1] == self.token

    def wait_event(self, deadline: float) -> bool:
        """Wait for an event on our token until `deadline` (monotonic); False on timeout."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            event = self.xs.read_watch(left)
            if event is None:
                return False
            if event[1] == self.token:
                self.drain()
                return True

    def close(self) -> None:
        try:
            self.xs.unwatch(self.path, self.token)
        except XenstoreError:
            pass


def backend_error(xs, backend_path: str) -> str:  # type: ignore[no-untyped-def]
    """"; the backend says: <reason>" when the backend wrote why it failed (the error node
    of xenbus_dev_error, "<errno> <message>", in <backend>/error), else "". The text is the
    backend's: shown, never trusted (printable characters only, 300 at most)."""
    try:
        raw = xs.read(f"{backend_path}/error")
    except XenstoreError:
        return ""
    text = "".join(c if c.isprintable() else "?" for c in raw[:300].decode(errors="replace")).strip()
    number, _, rest = text.partition(" ")
    if number.isdigit() and rest:
        text = rest
    return f"; the backend says: {text}" if text else ""


def describe_state(watch: BackendStateWatch) -> str:
    """The state last seen, for a timeout message: its name and raw value."""
    raw = watch.last_raw
    if raw is None:
        return "Unknown (no state node)"
    return f"{watch.last.name} ({raw.decode(errors='replace')})"


def timeout_error(what: str, watch: BackendStateWatch, waited: float) -> ConnectTimeout:
    return ConnectTimeout(
        "connect.timeout",
        f"backend {watch.path.rsplit('/', 1)[0]} never reached {what} within {waited:g} s; "
        f"its state is {describe_state(watch)}{backend_error(watch.xs, watch.path.rsplit('/', 1)[0])}",
    )


def feature_error(err: FeatureError, where: str) -> BlkfrontError:
    return BlkfrontError(err.rule, f"{where}: {err.detail}")
