"""blkfront's public value types: configuration, errors, futures and the device description.

Owns: `BlkfrontConfig` (what the frontend asks for), the exceptions blkfront raises
(`BlkfrontError` and its subclasses `DeviceFailed`, `RequestFailed`, `ConnectTimeout`),
`BlkFuture` (the completion of one submitted operation) and `DeviceInfo` (what was
negotiated and what the disk is).
Must not: do I/O or know about rings; blkfront.py re-exports everything here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from xentools.core.blkif import ABIS, BLKIF_MAX_INDIRECT_SEGMENTS
from xentools.core.errors import XentoolsError
from xentools.core.features import MAX_QUEUES, RING_PAGE_ORDER_LIMIT

__all__ = [
    "BlkFuture",
    "BlkfrontConfig",
    "BlkfrontError",
    "ConnectTimeout",
    "DeviceFailed",
    "DeviceInfo",
    "RequestFailed",
]


class BlkfrontError(XentoolsError):
    """blkfront refused or could not do something. `rule` names why; str() is one line
    "<rule>: <detail>"."""


class DeviceFailed(BlkfrontError):
    """The device is in its error state: the backend broke a rule (XSA-376 checks), stopped
    answering, closed, or a grant could not be revoked (XSA-396). Every request in flight
    and every later one fails with this; `rule` is the first violation seen."""


class RequestFailed(BlkfrontError):
    """The backend answered this request with BLKIF_RSP_ERROR or BLKIF_RSP_EOPNOTSUPP; the
    device itself is fine ("response.error", "response.eopnotsupp")."""


class ConnectTimeout(BlkfrontError):
    """The backend did not reach the state the handshake waits for in time; the message
    names the state it was seen in ("connect.timeout")."""


@dataclass(frozen=True)
class BlkfrontConfig:
    """What the frontend would like; the backend's offer cuts it down (negotiate()).

    - ring_page_order 0..4 (2**order pages per ring), num_queues 1..MAX_QUEUES.
    - max_indirect_segments: 0 (indirect requests off) or up to 4096; at most 11 means no
      indirect requests, as in Linux blkfront (a direct request carries 11).
    - persistent: ask for persistent grants (used only if the backend offers them too).
    - protocol: the ABI written to `protocol` and used on the ring: "x86_64-abi" or
      "x86_32-abi".
    - large_sector_size: write feature-large-sector-size=1 (sector quantities in units of the
      backend's sector-size; sector sizes above 4096 are still refused).
    - max_grants: grant budget of this device (ring pages + indirect pages + data pages);
      Linux gntalloc allows 1024 per process by default.
    - max_persistent_grants: with persistent grants, the most pages the frontend keeps
      granted for data and indirect pages: the backend's persistent-grant cache per ring
      (Linux blkback's max_persistent_grants, 1056, is the default). A frontend cycling
      through more pages than the backend caches makes it map and unmap on every request.
    - connect_timeout, request_timeout, close_timeout: seconds.
    """

    ring_page_order: int = 2
    num_queues: int = 2
    max_indirect_segments: int = 256
    persistent: bool = True
    protocol: str = "x86_64-abi"
    large_sector_size: bool = True
    max_grants: int = 1024
    max_persistent_grants: int = 1056
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    close_timeout: float = 5.0

    def __post_init__(self) -> None:
        def check_int(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise BlkfrontError(f"config.{name}", f"{value!r} is not an integer in {low}..{high}")

        check_int("ring_page_order", 0, RING_PAGE_ORDER_LIMIT)
        check_int("num_queues", 1, MAX_QUEUES)
        check_int("max_indirect_segments", 0, BLKIF_MAX_INDIRECT_SEGMENTS)
        check_int("max_grants", 16, 1 << 20)
        check_int("max_persistent_grants", 4 * 11, 1 << 20)  # room for 4 direct requests
        for name in ("persistent", "large_sector_size"):
            if not isinstance(getattr(self, name), bool):
                raise BlkfrontError(f"config.{name}", f"{getattr(self, name)!r} is not a bool")
        if self.protocol not in ABIS:
            raise BlkfrontError("config.protocol", f"{self.protocol!r} is not one of {sorted(ABIS)}")
        for name in ("connect_timeout", "request_timeout", "close_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
                raise BlkfrontError(f"config.{name}", f"{value!r} is not a positive number of seconds")


@dataclass(frozen=True)
class DeviceInfo:
    """A connected device: the disk and the negotiated transport and features."""

    frontend_path: str
    backend_path: str
    backend_id: int
    virtual_device: int
    protocol: str
    sectors: int
    sector_size: int
    physical_sector_size: int
    readonly: bool
    cdrom: bool
    removable: bool
    ring_page_order: int
    ring_entries: int
    num_queues: int
    max_indirect_segments: int  # negotiated (0: direct requests only)
    segments_per_request: int  # what requests really carry, within the grant budget
    persistent: bool
    large_sector_size: bool
    flush_cache: bool
    barrier: bool
    discard: bool
    discard_secure: bool
    max_grants: int
    data_pages: int = 0  # pages for data and indirect segments (persistent: at most max_persistent_grants)

    @property
    def size_bytes(self) -> int:
        return self.sectors * self.sector_size

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["size_bytes"] = self.size_bytes
        return out


class BlkFuture:
    """The completion of one submitted operation (read, write, flush, discard).

    `result(timeout)` returns the data of a read into a new buffer (bytes), the number of
    bytes of a readinto, or None; it raises the operation's error (RequestFailed,
    DeviceFailed). Callbacks added with `add_done_callback(fn)` run as fn(future) on the
    frontend's completion thread, under the device lock: they may submit more I/O but must
    not wait for a future (that would wait for the thread running them).
    """

    __slots__ = ("_lock", "_done", "_result", "_exc", "_event", "_callbacks", "_owner")

    def __init__(self, lock: threading.RLock, owner: Any) -> None:
        self._lock = lock
        self._owner = owner  # the device: tells whether we run on its completion thread
        self._done = False
        self._result: Any = None
        self._exc: BaseException | None = None
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[BlkFuture], None]] | None = None

    def done(self) -> bool:
        return self._done

    def _finish(self, result: Any, exc: BaseException | None) -> None:
        """Called under the device lock; only the first call counts."""
        if self._done:
            return
        self._result = result
        self._exc = exc
        self._done = True
        if self._event is not None:
            self._event.set()
        callbacks, self._callbacks = self._callbacks, None
        if callbacks:
            for fn in callbacks:
                self._call(fn)

    def _call(self, fn: Callable[[BlkFuture], None]) -> None:
        # A callback's own failure must not break the completion thread (and with it the
        # device); it is counted on the device and otherwise dropped.
        try:
            fn(self)
        except Exception:  # noqa: BLE001 - user code
            self._owner._callback_failed()

    def add_done_callback(self, fn: Callable[[BlkFuture], None]) -> None:
        with self._lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        self._call(fn)

    def _wait(self, timeout: float | None) -> None:
        if self._done:
            return
        with self._lock:
            if self._done:
                return
            if self._owner._on_completion_thread():
                raise BlkfrontError(
                    "future.wait_in_callback", "a completion callback cannot wait for a future"
                )
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not event.wait(timeout):
            raise BlkfrontError("future.timeout", f"operation not complete after {timeout} s")

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exc
