"""Userspace blkback: serve a RAW image file to one blkif frontend, and report its conformance.

Owns: `BackendConfig` (what this backend offers), `BlkBackend` (one vbd: the xenbus handshake
as the backend, driven by xenbus.Handshake; the queues while connected; the conformance
report), `serve()` (the order of the checks before serving: the vbd lock, the toolstack's
keys, the image named by `params`, its format, size and lock), `write_device_error` (the
error node of Linux's xenbus_dev_error). Its one command line is `xentools blkback serve`
(xentools/tools/blkback_cmd.py), which calls serve(). With --fault, blkback_faults
misbehaves on purpose at the lines marked FAULT HOOK.
Must not: implement ring, request or key formats (core does), image formats
(core.diskformat), locks (blkback_lock), know whether the platform is real Xen or the
software Xen, or trust anything the frontend wrote.

What is served: the vbd's `params` (the toolstack's record of the disk); --image, when
given, must name the same file (or is used when the vbd has no params). `mode` "r" serves
read-only. One process serves a vbd (a flock held for its lifetime: a second is refused
naming the first's pid); an image is served writable by one process unless the user says
otherwise (--shared-writable, or mode "w!": xl's `w!`).
When the image cannot be served (missing, unreadable, not RAW, an odd size, read-only for
a writable vbd), the frontend is told at once, as Linux's blkback does (xenbus_dev_fatal):
"<errno> <message>" in error/<backend nodename>/error of the backend's domain and in
<backend>/error (which the frontend can read), and state Closing; then the process exits 1
with the same one line. A frontend that breaks a handshake rule gets the same error node.

What is offered (BackendFeatures, written before InitWait): max-ring-page-order (default
4), multi-queue-max-queues (default 4), feature-max-indirect-segments (default 256; 0 leaves
the key out), feature-persistent, feature-flush-cache, feature-barrier, and feature-discard
with discard-granularity = the image's sector size, discard-alignment 0, discard-secure 0
(when the image is writable and its filesystem can punch holes).
At Connected (DiskInfo): sector-size is the image's sector size when the frontend wrote
feature-large-sector-size=1; otherwise 512 (blkif.h: a frontend that did not say it copes
must see 512), with physical-sector-size = the image's sector size. `info` has
VDISK_READONLY in read-only mode (toolstack `mode` = "r", or --read-only).

Lifecycle: the xenbus.Handshake table decides; this module only performs its actions.
- A frontend that breaks a handshake rule (missing ring-ref, order or queue count above the
  offer, unknown protocol, a state the table does not allow or that is no state at all, "0"
  included, refs that cannot be mapped) is counted in the report, the error node says
  why, and the device goes to Closing (Linux: xenbus_dev_fatal).
- A fatal ring violation (the request producer overflowing the ring) stops that queue and
  feeds `error`: disconnect, Closing.
- When the frontend's domain is released (@releaseDomain), the device disconnects and goes
  to Closed, waiting for a reconnect (a frontend process that dies without its domain
  leaves nothing to notice: its rings simply stay idle). When the frontend's directory
  disappears after the handshake began, the table tears the device down and the backend
  exits; so it does when its own directory disappears, when `online` is 0 and the device
  is Closed, and on request_stop() (SIGTERM, SIGINT).
On every way out, every queue is stopped, every grant unmapped and every port unbound
before the backend writes Closed, so a frontend can revoke its grants (XSA-396). The
report (blkback_conformance: every frontend met, connected or not) is written to --report
FILE, or stdout for "-", on SIGUSR1 and at exit, before the signal handlers are restored.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import selectors
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from xentools.core.blkif import BLKIF_MAX_INDIRECT_SEGMENTS, VDISK_READONLY, abi_for_protocol
from xentools.core.errors import ProtocolError, XentoolsError
from xentools.core.features import (
    RING_PAGE_ORDER_LIMIT,
    BackendFeatures,
    DiskInfo,
    FeatureError,
    FrontendRingInfo,
    parse_uint,
)
from xentools.core.xenbus import Action, Handshake, Milestone, Step, XenbusState, parse_state
from xentools.devices.blkback_conformance import STATE_RULES, ConformanceReport, FrontendLog
from xentools.devices.blkback_faults import FaultSet, FaultSpec
from xentools.devices.blkback_grants import DEFAULT_MAX_PERSISTENT_GRANTS
from xentools.devices.blkback_image import ImageError, ImageFile, open_image
from xentools.devices.blkback_lock import LockError, lock_dir, lock_image, lock_vbd
from xentools.devices.blkback_queue import DeviceGate, QueueWorker
from xentools.devices.blkback_validate import RequestPolicy
from xentools.platform.interface import Platform, PlatformError, XenstoreError
from xentools.platform.xenstore import run_transaction

__all__ = [
    "BackendConfig", "BackendError", "BlkBackend", "LockError", "serve", "write_device_error",
    "write_report",
]

log = logging.getLogger("xentools.blkback")

MAX_QUEUES_LIMIT = 64  # more queues than this is a configuration mistake, not a wish
# backend/<kind>/: "vbd", or another kind where Linux's xen-blkback claims backend/vbd/
# (toolstack.USERSPACE_BACKEND_KIND).
_BACKEND_PATH = re.compile(r"^/local/domain/(\d+)/backend/[a-z][a-z0-9]{0,7}/(\d+)/(\d+)$")


class BackendError(XentoolsError):
    """The backend cannot start or run: bad configuration, a backend directory without the
    toolstack's keys, or a platform failure. One line, naming what is wrong."""


@dataclass(frozen=True)
class BackendConfig:
    """What the backend offers; every field maps to a command-line option."""

    read_only: bool = False
    max_ring_page_order: int = RING_PAGE_ORDER_LIMIT
    max_queues: int = 4
    max_indirect_segments: int = 256
    persistent: bool = True
    sector_size: int = 512
    max_persistent_grants: int = DEFAULT_MAX_PERSISTENT_GRANTS
    report_path: str | None = None  # "-": stdout
    shared_writable: bool = False  # xl's w!: the image may be served writable elsewhere too
    faults: tuple[FaultSpec, ...] = ()  # --fault: misbehave on purpose (blkback_faults)
    discard: bool = True  # offer feature-discard where the image can punch holes (--no-discard)

    def __post_init__(self) -> None:
        if not 0 <= self.max_ring_page_order <= RING_PAGE_ORDER_LIMIT:
            raise BackendError(f"config.max_ring_page_order: {self.max_ring_page_order} not in 0..{RING_PAGE_ORDER_LIMIT}")
        if not 1 <= self.max_queues <= MAX_QUEUES_LIMIT:
            raise BackendError(f"config.max_queues: {self.max_queues} not in 1..{MAX_QUEUES_LIMIT}")
        if not 0 <= self.max_indirect_segments <= BLKIF_MAX_INDIRECT_SEGMENTS:
            raise BackendError(
                f"config.max_indirect_segments: {self.max_indirect_segments} not in 0..{BLKIF_MAX_INDIRECT_SEGMENTS}"
            )
        size = self.sector_size
        if size < 512 or size > 4096 or size & (size - 1):
            raise BackendError(f"config.sector_size: {size} is not a power of two in 512..4096")
        if self.max_persistent_grants < 0:
            raise BackendError(f"config.max_persistent_grants: {self.max_persistent_grants} < 0")


class _LazyKeys(Mapping):
    """A frontend directory read key by key (only the keys a parser asks for are read, so a
    hostile frontend cannot make us list a huge directory). Iteration is not supported."""

    def __init__(self, xs, base: str, tx: int) -> None:  # type: ignore[no-untyped-def]
        self._xs = xs
        self._base = base
        self._tx = tx

    def __getitem__(self, key: str) -> bytes:
        try:
            return self._xs.read(f"{self._base}/{key}", self._tx)
        except XenstoreError as err:
            if err.errno_name == "ENOENT":
                raise KeyError(key) from None
            raise

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class BlkBackend:
    """One vbd served by this process. run() blocks until the device is gone or
    request_stop() is called; it always leaves nothing mapped or bound."""

    def __init__(
        self,
        platform: Platform,
        backend_path: str,
        image: ImageFile,
        config: BackendConfig = BackendConfig(),
        report: ConformanceReport | None = None,
    ) -> None:
        self.platform = platform
        self.backend_path = backend_path.rstrip("/")
        self.image = image
        self.config = config
        self.report = report if report is not None else ConformanceReport(self.backend_path)
        self.faults = FaultSet(config.faults)  # FAULT HOOK: empty unless --fault
        if self.faults:
            self.report.sections["faults"] = self.faults.as_dict
            self.faults.closing = lambda why: self._queue_failed(None, why)  # type: ignore[arg-type]
        self.handshake = Handshake("backend")
        self.queues: list[QueueWorker] = []
        self.frontend_path = ""
        self.frontend_id = -1
        self.read_only = config.read_only or image.read_only
        self.discard = config.discard and not self.read_only and image.can_punch_holes()
        self._log: FrontendLog | None = None
        self._xs = None
        self._stop = threading.Event()
        self._report_wanted = threading.Event()
        self._fatal: list[str] = []
        self._fatal_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._online = True
        self._large_sectors = False
        self.policy: RequestPolicy | None = None
        self._done = False
        self.started = False  # True once connected to xenstore (the report then means something)
        self.exit_reason = ""
        self._peer_state = XenbusState.Unknown
        self._bad_state: bytes | None = None  # the malformed state value last judged

    # -- control from other threads or signal handlers ------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake (pipe full) or closing

    def request_stop(self) -> None:
        """Ask run() to disconnect, write Closed and return (safe from a signal handler)."""
        self._stop.set()
        self._wake()

    def request_report(self) -> None:
        """Ask run() to write the report file now (SIGUSR1)."""
        self._report_wanted.set()
        self._wake()

    def write_report(self) -> None:
        """Write the report where --report says: a file (atomically), or stdout for "-"."""
        write_report(self.report, self.config.report_path)

    # -- the main loop ----------------------------------------------------------------------------

    def run(self) -> None:
        xs = self._xs = self.platform.open_xenstore()
        self.started = True
        try:
            self._read_toolstack_keys()
            xs.watch(f"{self.frontend_path}/state", "frontend-state")
            xs.watch(f"{self.backend_path}/online", "online")
            xs.watch(f"{self.backend_path}/state", "backend-state")
            if self.frontend_id != self.platform.domid:
                xs.watch("@releaseDomain", "release")
            self._step(self.handshake.milestone(Milestone.start))
            sel = selectors.DefaultSelector()
            sel.register(xs.fileno(), selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._done and not self._stop.is_set():
                    self._drain_wake()
                    self._handle_fatal()
                    if self._report_wanted.is_set():
                        self._report_wanted.clear()
                        self.write_report()
                    while not self._done and (event := xs.read_watch(timeout=0)) is not None:
                        self._watch_fired(event[1])
                    if self._done or self._stop.is_set():
                        break
                    sel.select(1.0)
            finally:
                sel.close()
            if self._stop.is_set() and not self.exit_reason:
                self.exit_reason = "stop requested"
        finally:
            if not self.exit_reason:
                self.exit_reason = "backend failed"
            self._disconnect(f"backend stopped: {self.exit_reason}")
            self.report.ended = self.exit_reason
            self._write_state_if_present(XenbusState.Closed)
            try:
                xs.close()
            finally:
                self._xs = None
                for fd in (self._wake_r, self._wake_w):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                self._wake_r = self._wake_w = -1

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _read_toolstack_keys(self) -> None:
        xs = self._xs
        try:
            frontend = xs.read(f"{self.backend_path}/frontend").decode()
            frontend_id = xs.read(f"{self.backend_path}/frontend-id")
        except XenstoreError as err:
            raise BackendError(
                f"backend.toolstack: {self.backend_path} lacks the toolstack's keys"
                f" (frontend, frontend-id): {err}"
            ) from None
        except UnicodeDecodeError:
            raise BackendError(f"backend.toolstack: {self.backend_path}/frontend is not text") from None
        try:
            self.frontend_id = parse_uint(frontend_id, "backend.frontend-id", maximum=0x7FEF)
        except FeatureError as err:
            raise BackendError(f"backend.toolstack: {err}") from None
        self.frontend_path = frontend.rstrip("/")
        try:
            mode = xs.read(f"{self.backend_path}/mode")
        except XenstoreError:
            mode = b"w"
        if mode == b"r":
            self.read_only = True
            self.discard = False
        self._log = self.report.frontend(self.frontend_path)

    def _watch_fired(self, token: str) -> None:
        xs = self._xs
        if token == "frontend-state":
            try:
                raw = xs.read(f"{self.frontend_path}/state")
            except XenstoreError as err:
                if err.errno_name is None:
                    raise  # transport failure: ours, not the frontend's
                if err.errno_name != "ENOENT":
                    # The frontend owns its state node and may have hidden it from us.
                    self._fail("frontend.state.unreadable", f"frontend state: {err}")
                    return
                raw = None
            if raw is not None and raw == self._bad_state:
                return  # a second event for the value already judged (watches coalesce)
            try:
                state = parse_state(raw)
                if raw is not None and state == XenbusState.Unknown:
                    # 0 is what a missing node reads as; no device writes it (xenbus.h).
                    raise FeatureError("state.unknown", f"the frontend wrote {raw[:16]!r} (Unknown)")
            except FeatureError as err:
                self._bad_state = raw
                self._fail(err.rule, f"frontend state: {err}")
                return
            self._bad_state = None
            self._log_checked(*STATE_RULES)
            self._peer(state)
        elif token == "online":
            try:
                self._online = xs.read(f"{self.backend_path}/online") != b"0"
            except XenstoreError:
                self._online = True  # absent: stay, as a process that serves one vbd
            if not self._online:
                self._feed_milestone(Milestone.close_requested)
                self._maybe_finish()
        elif token == "backend-state":
            if not xs.exists(f"{self.backend_path}/state"):
                self.exit_reason = "backend directory removed"
                self._done = True
        elif token == "release":
            try:
                alive = xs.is_introduced(self.frontend_id)
            except XenstoreError:
                return  # cannot tell (not privileged enough): keep serving
            if not alive and self.handshake.state != XenbusState.Closed:
                log.info("frontend domain %d is gone", self.frontend_id)
                self._disconnect(f"frontend domain {self.frontend_id} is gone")
                self._peer(XenbusState.Closed)

    def _peer(self, state: XenbusState) -> None:
        try:
            step = self.handshake.peer_changed(state)
        except ProtocolError as err:
            self._fail(err.rule, str(err))
            return
        self._peer_state = state
        self._step(step)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self._online and self.handshake.state == XenbusState.Closed:
            self.exit_reason = "closed and offline"
            self._done = True

    def _feed_milestone(self, milestone: Milestone) -> None:
        try:
            step = self.handshake.milestone(milestone)
        except ProtocolError as err:
            log.debug("milestone %s ignored: %s", milestone, err)
            return
        self._step(step)

    def _step(self, step: Step) -> None:
        """Carry out one Step: actions in order, then the state; a failed action feeds
        `error` instead of writing the state."""
        follow: Milestone | None = None
        for action in step.actions:
            try:
                if action == Action.publish_features:
                    self._publish_features()
                    follow = Milestone.features_published
                elif action == Action.map_rings:
                    self._map_rings()
                    follow = Milestone.rings_mapped
                elif action == Action.publish_disk_info:
                    self._publish_disk_info()
                elif action == Action.disconnect:
                    self._disconnect(f"frontend went to {self._peer_state.name}")
                elif action == Action.teardown:
                    self._disconnect("frontend directory removed")
                    self.exit_reason = "frontend directory removed"
                    if self._log is not None:
                        self._log.ended(self.exit_reason)
                    self._done = True
            except ProtocolError as err:
                self._fail(err.rule, str(err))
                return
            except XenstoreError as err:
                if action != Action.map_rings or err.errno_name is None:
                    raise
                # The frontend's keys cannot be read (its permissions, removed mid-way).
                self._fail("frontend.keys.unreadable", f"{action.value}: {err}")
                return
        if step.new_state is not None:
            self._write_state_if_present(step.new_state)
        if follow is not None:
            self._feed_milestone(follow)

    def _violation(self, rule: str, message: str) -> None:
        log.warning("frontend %s: %s", self.frontend_path, message)
        if self._log is not None:
            self._log.record(rule, message)

    def _log_checked(self, *rules: str) -> None:
        if self._log is not None:
            self._log.checked(*rules)

    def _fail(self, rule: str, message: str) -> None:
        """The frontend broke `rule`: count it, tell the frontend why (the error node) and
        close the device (Linux: xenbus_dev_fatal)."""
        self._violation(rule, message)
        self._close_with_error(errno.EINVAL, message, f"frontend broke {rule}")

    def _close_with_error(self, err: int, message: str, why: str) -> None:
        self._disconnect(why)
        if self._log is not None:
            self._log.ended(why)
        if self._xs is not None:
            try:
                write_device_error(self._xs, self.backend_path, err, message)
            except PlatformError as exc:
                log.warning("writing the error node: %s", exc)
        self._feed_milestone(Milestone.error)

    # -- actions ------------------------------------------------------------------------------------

    def _transaction(self, work) -> bool:  # type: ignore[no-untyped-def]
        """Run work(tx) in a transaction (in_backend_transaction)."""
        return in_backend_transaction(self._xs, self.backend_path, work)

    def _write_keys(self, keys: Mapping[str, str], remove: tuple[str, ...] = ()) -> None:
        """Write `keys` (and remove the `remove` keys present) in one transaction."""
        xs = self._xs

        def work(tx: int) -> None:
            for key, value in keys.items():
                xs.write(f"{self.backend_path}/{key}", value, tx)
            for key in remove:
                if xs.exists(f"{self.backend_path}/{key}", tx):
                    xs.rm(f"{self.backend_path}/{key}", tx)

        if not self._transaction(work):
            self.exit_reason = "backend directory removed"
            self._done = True

    def _write_state_if_present(self, state: XenbusState) -> None:
        if self._xs is None:
            return
        try:
            self._write_keys({"state": str(int(state))})
        except PlatformError as err:
            log.warning("writing state %s: %s", state.name, err)

    def backend_features(self) -> BackendFeatures:
        """The offer written before InitWait."""
        config = self.config
        return BackendFeatures(
            feature_flush_cache=True,
            feature_barrier=True,
            feature_discard=self.discard,
            discard_granularity=self.image.sector_size if self.discard else None,
            discard_alignment=0 if self.discard else None,
            discard_secure=False,
            feature_persistent=config.persistent,
            feature_max_indirect_segments=config.max_indirect_segments,
            max_ring_page_order=config.max_ring_page_order,
            multi_queue_max_queues=config.max_queues,
        )

    def _publish_features(self) -> None:
        # An earlier connection's error node goes: it no longer says why the device fails.
        keys = self.backend_features().to_keys()
        if self.faults:  # FAULT HOOK: absurd feature values
            keys = self.faults.feature_keys(keys)
        self._write_keys(keys, remove=("error",))

    def _read_ring_info(self) -> FrontendRingInfo:
        xs = self._xs
        tx = xs.transaction_start()
        try:
            keys = _LazyKeys(xs, self.frontend_path, tx)
            # Bound the key walk before parsing: the parser would read up to 256 queues.
            raw = keys.get("multi-queue-num-queues")
            if raw is not None:
                count = parse_uint(raw, "frontend.multi-queue-num-queues", minimum=1)
                if count > self.config.max_queues:
                    raise FeatureError(
                        "frontend.multi-queue-num-queues.range",
                        f"{count} queues is above the backend's multi-queue-max-queues {self.config.max_queues}",
                    )
            info = FrontendRingInfo.from_keys(keys)
        finally:
            try:
                xs.transaction_end(tx, commit=False)
            except XenstoreError:
                pass
        info.validate(max_ring_page_order=self.config.max_ring_page_order, max_queues=self.config.max_queues)
        return info

    def _map_rings(self) -> None:
        self._disconnect()  # idempotent: a reconnect starts from nothing
        info = self._read_ring_info()
        abi = abi_for_protocol(info.protocol)
        self._large_sectors = info.feature_large_sector_size
        unit = self.image.sector_size if info.feature_large_sector_size else 512
        policy = RequestPolicy(
            disk_bytes=self.image.size,
            unit=unit,
            readonly=self.read_only,
            max_indirect_segments=self.config.max_indirect_segments,
            flush_cache=True,
            barrier=True,
            discard=self.discard,
            discard_secure=False,
        )
        persistent = self.config.persistent and info.feature_persistent
        gate = DeviceGate(info.num_queues)
        assert self._log is not None
        queues: list[QueueWorker] = []
        try:
            for index, queue in enumerate(info.queues):
                queues.append(
                    QueueWorker(
                        index=index,
                        platform=self.platform,
                        frontend_id=self.frontend_id,
                        ring_refs=queue.ring_refs,
                        event_channel=queue.event_channel,
                        abi=abi,
                        policy=policy,
                        image=self.image,
                        gate=gate,
                        log_to=self._log,
                        persistent=persistent,
                        max_persistent=self.config.max_persistent_grants,
                        on_fatal=self._queue_failed,
                        faults=self.faults,  # FAULT HOOK
                    )
                )
        except BaseException:
            for worker in queues:
                worker.stop()
            raise
        self.queues = queues
        self.policy = policy
        log.info(
            "connecting %s: %d queue(s), ring order %d, %s, persistent %s, %d-byte sectors",
            self.frontend_path, info.num_queues, info.order, abi.name, persistent, unit,
        )
        self._log.connected({
            "protocol": abi.name,
            "ring-page-order": info.order,
            "queues": info.num_queues,
            "persistent": persistent,
            "large-sector-size": info.feature_large_sector_size,
            "sector-size": unit,
            "max-indirect-segments": self.config.max_indirect_segments,
            "flush-cache": True,
            "barrier": True,
            "discard": self.discard,
            "read-only": self.read_only,
        })
        for worker in queues:
            worker.start()

    def _publish_disk_info(self) -> None:
        unit = self.image.sector_size if self._large_sectors else 512
        info = DiskInfo(
            sectors=self.image.size // unit,
            info=VDISK_READONLY if self.read_only else 0,
            sector_size=unit,
            physical_sector_size=self.image.sector_size,
        )
        keys = info.to_keys()
        if self.faults:  # FAULT HOOK: absurd disk size values
            keys = self.faults.disk_keys(keys)
        self._write_keys(keys)

    def _disconnect(self, why: str = "reconnect") -> None:
        queues, self.queues = self.queues, []
        for worker in queues:
            worker.stop()
        if queues and self._log is not None:
            self._log.disconnected(why)

    # -- fatal ring violations (from queue threads) ---------------------------------------------------

    def _queue_failed(self, worker: QueueWorker, message: str) -> None:
        with self._fatal_lock:
            self._fatal.append(message)
        self._wake()

    def _handle_fatal(self) -> None:
        with self._fatal_lock:
            fatal, self._fatal = self._fatal, []
        if fatal:
            log.error("closing %s: %s", self.backend_path, fatal[0])
            self._close_with_error(errno.EIO, fatal[0], f"ring failed: {fatal[0]}")


# -- process entry -------------------------------------------------------------------------------------

# errno written with an image failure (Linux writes "<errno> <message>").
_IMAGE_ERRNO = {
    "image.missing": errno.ENOENT, "image.read_only": errno.EROFS, "image.unreadable": errno.EIO,
    "image.not_a_file": errno.ENODEV,
}


def parse_backend_path(path: str) -> tuple[int, int, int]:
    """(backend domid, frontend domid, devid) of a blkif backend directory; BackendError if
    the path is not /local/domain/<n>/backend/<kind>/<frontend>/<devid> (kind: "vbd", or
    "xtvbd" beside Linux's xen-blkback, which claims every node under backend/vbd/)."""
    match = _BACKEND_PATH.match(path.rstrip("/"))
    if match is None:
        raise BackendError(
            f"backend.path: {path!r} is not /local/domain/<domid>/backend/<kind>/<frontend-domid>/<devid>"
        )
    return int(match[1]), int(match[2]), int(match[3])


def in_backend_transaction(xs, backend_path: str, work) -> bool:  # type: ignore[no-untyped-def]
    """Run work(tx) in a transaction, repeated on EAGAIN. False (nothing written) if the
    backend directory is gone: its `frontend` key, written by the toolstack, is missing."""

    def checked(tx: int) -> bool:
        present = xs.exists(f"{backend_path}/frontend", tx)
        if present:
            work(tx)
        return present

    return run_transaction(xs, checked, what=backend_path)


def write_device_error(xs, backend_path: str, err: int, message: str, *, closing: bool = False) -> bool:  # type: ignore[no-untyped-def]
    """Tell the frontend why the device fails, as Linux's xenbus_dev_error does: the value
    "<errno> <message>" in error/<nodename>/error under the backend domain's home (where
    Linux writes it; a frontend domain cannot read it) and in <backend>/error (which the
    frontend can read). With `closing`, also state Closing (xenbus_dev_fatal), for a
    failure before the handshake table runs. One transaction; False if the vbd is gone."""
    value = f"{err} {message}"[:4000]
    backend_path = backend_path.rstrip("/")
    match = _BACKEND_PATH.match(backend_path)
    home = f"/local/domain/{match[1]}" if match else None

    def work(tx: int) -> None:
        xs.write(f"{backend_path}/error", value, tx)
        if home is not None:
            xs.write(f"{home}/error/{backend_path[len(home) + 1:]}/error", value, tx)
        if closing:
            xs.write(f"{backend_path}/state", str(int(XenbusState.Closing)), tx)

    return in_backend_transaction(xs, backend_path, work)


def write_report(report: ConformanceReport, path: str | None) -> None:
    """The report to `path` (atomically), to stdout for "-", nowhere for None."""
    if not path:
        return
    if path == "-":
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    else:
        report.write(path)


@dataclass(frozen=True)
class VbdKeys:
    """What the toolstack wrote in the backend directory that decides what is served."""

    frontend: str
    params: str | None  # the image (xl: target=); None when absent or empty
    mode: str  # "r", "w" (default) or "w!"


def read_vbd_keys(xs, backend_path: str) -> VbdKeys:  # type: ignore[no-untyped-def]
    """The toolstack's keys of the vbd; BackendError "backend.toolstack" without them."""

    def optional(key: str) -> str | None:
        try:
            return xs.read(f"{backend_path}/{key}").decode()
        except XenstoreError:
            return None
        except UnicodeDecodeError:
            raise BackendError(f"backend.toolstack: {backend_path}/{key} is not text") from None

    frontend = optional("frontend")
    if frontend is None or optional("frontend-id") is None:
        raise BackendError(
            f"backend.toolstack: {backend_path} lacks the toolstack's keys (frontend, frontend-id);"
            " create the vbd first: xentools vbd create"
        )
    return VbdKeys(frontend.rstrip("/"), optional("params") or None, optional("mode") or "w")


def choose_image(vbd: VbdKeys, backend_path: str, image_path: str | None) -> str:
    """The image to serve: the vbd's `params`; `image_path` (--image) must name the same
    file, or is used when the vbd has no params. BackendError "backend.params" otherwise."""
    if vbd.params is None:
        if image_path is None:
            raise BackendError(
                f"backend.params: {backend_path} names no image (no params key); give --image FILE"
            )
        return image_path
    if image_path is None or _same_file(vbd.params, image_path):
        return vbd.params
    raise BackendError(
        f"backend.params: {backend_path} serves {vbd.params} (its params key), not {image_path};"
        " omit --image, or recreate the vbd with that image (xentools vbd create)"
    )


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class _Signals:
    """SIGTERM and SIGINT ask the backend to stop, SIGUSR1 to write its report. Installed
    before anything else and restored only after the report is written, so a signal that
    arrives early or late stops the backend cleanly instead of killing it unreported."""

    def __init__(self, install: bool) -> None:
        self.backend: BlkBackend | None = None
        self.stopped = False
        self.previous: dict[int, object] = {}
        if install:
            for sig, handler in ((signal.SIGTERM, self._stop), (signal.SIGINT, self._stop),
                                 (signal.SIGUSR1, self._report)):
                self.previous[sig] = signal.signal(sig, handler)

    def _stop(self, *_: object) -> None:
        self.stopped = True
        if self.backend is not None:
            self.backend.request_stop()

    def _report(self, *_: object) -> None:
        if self.backend is not None:
            self.backend.request_report()

    def attach(self, backend: BlkBackend) -> None:
        self.backend = backend

    def restore(self) -> None:
        """Put the previous handlers back; once a stop signal came, SIGTERM and SIGINT are
        ignored instead: the process is ending, and a second signal of a burst must not kill
        it (exit -15) between the report and its own exit status."""
        for sig, handler in self.previous.items():
            if self.stopped and sig in (signal.SIGTERM, signal.SIGINT):
                handler = signal.SIG_IGN
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self.previous = {}


def serve(
    *,
    sim_dir: str | None,
    backend_path: str,
    image_path: str | None,
    config: BackendConfig,
    install_signals: bool = True,
) -> ConformanceReport:
    """Serve the vbd at `backend_path` until stopped; write the report (config.report_path).

    In order: the vbd lock (one blkback per vbd: LockError "backend.busy" with the holder's
    pid), the toolstack's keys, the image (`params`, or `image_path` when it names the same
    file), its format and size, and its lock (LockError "image.in_use" when another process
    serves it writable, unless config.shared_writable). An image that cannot be served is
    reported to the frontend (error node, state Closing) and raised as ImageError. Every
    failure is one line (ImageError, BackendError, LockError, PlatformError); none before
    the vbd lock touches xenstore.
    """
    from xentools.platform.select import SIM_DIR_ENV, open_platform

    backend_path = backend_path.rstrip("/")
    backend_domid, _, _ = parse_backend_path(backend_path)
    sim_dir = sim_dir or os.environ.get(SIM_DIR_ENV) or None
    signals = _Signals(install_signals)
    try:
        if sim_dir:
            platform = open_platform(sim_dir, backend_domid)
        else:
            platform = open_platform(None)  # real Xen: this domain is whatever Xen says
            if platform.domid != backend_domid:
                platform.close()
                raise BackendError(
                    f"backend.path: this is domain {platform.domid}, but {backend_path} belongs to"
                    f" domain {backend_domid}"
                )
        try:
            lock = lock_vbd(lock_dir(sim_dir), backend_path)
            try:
                return _serve_locked(platform, backend_path, image_path, config, signals)
            finally:
                lock.close()
        finally:
            platform.close()
    finally:
        signals.restore()


def _serve_locked(platform: Platform, backend_path: str, image_path: str | None, config: BackendConfig,
                  signals: _Signals) -> ConformanceReport:
    report = ConformanceReport(backend_path)
    xs = platform.open_xenstore()
    try:
        vbd = read_vbd_keys(xs, backend_path)
        frontend_log = report.frontend(vbd.frontend)
        path = choose_image(vbd, backend_path, image_path)
        read_only = config.read_only or vbd.mode == "r"
        try:
            image = open_image(path, read_only=read_only, sector_size=config.sector_size)
        except ImageError as err:
            # The vbd cannot be served: the frontend hears it now, not after its timeout.
            write_device_error(xs, backend_path, _IMAGE_ERRNO.get(err.rule, errno.EINVAL), str(err), closing=True)
            report.ended = f"image refused: {err}"
            frontend_log.ended("the backend could not open its image")
            write_report(report, config.report_path)
            raise
    finally:
        xs.close()
    try:
        lock_image(image.fd, path, writable=not read_only,
                   shared_writable=config.shared_writable or vbd.mode == "w!")
        backend = BlkBackend(platform, backend_path, image, config, report)
        signals.attach(backend)
        try:
            if signals.stopped:
                backend.exit_reason = "stop requested"
                report.ended = backend.exit_reason
            else:
                backend.run()
        finally:
            backend.write_report()  # before the signal handlers are restored
        return report
    finally:
        image.close()
