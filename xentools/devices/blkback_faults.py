"""Deliberate backend misbehaviour for `blkback serve --fault SPEC`: a frontend test kit.

Owns: the fault spec grammar (`parse_fault`, pure: no I/O), `FaultSpec`, `FaultSpecError`,
and `FaultSet`, the one object the blkback consults at its marked hooks ("FAULT HOOK"):
- QueueWorker._publish, before the responses are packed (`FaultSet.responses`: a response
  with an unknown id, a duplicate, a wrong operation, a status outside blkif's, ERROR for a
  valid request, no answer at all, a late answer, Closing mid-I/O through the backend's
  `closing` callback) and where they are published (`FaultSet.push`, instead of the honest
  push: a response for a request never sent, rsp_prod more than a ring beyond req_prod, an
  event storm);
- a queue's grant mapper (`FaultSet.mapper`: grants kept mapped after the response);
- the image a queue reads from (`FaultSet.image`: READ answered OKAY without the data
  written, or with flipped bytes). Only what is copied into the guest's pages is touched:
  the image file itself is never written by a fault;
- the keys published at connect (`FaultSet.feature_keys`, `FaultSet.disk_keys`: absurd
  feature values and disk sizes).
Each fault counts how often it fired and when first; `as_dict()` is the report's "faults".
Must not: decide anything about honest serving (blkback, blkback_queue do), or touch
xenstore, rings or images except through the values handed to its hooks.

Grammar: KIND[:TRIGGER[,TRIGGER...]], TRIGGER one of
  after=N   N matching requests are served honestly, the fault fires once on request N+1;
  every=N   fires on every Nth matching request (N, 2N, ...);
  p=X       fires on each matching request with probability X (0 <= X <= 1; seeded, so a
            run is repeatable);
  on=read|write|flush   only requests of that operation match (default: every request);
  delay=S   (late only) seconds the answer is held back (default 10).
At most one of after/every/p; a bare KIND fires once, on the first matching request.
Connect kinds (absurd values at connect) take no trigger; read-data kinds match READs only;
keep-mapped counts per-request mappings (none with persistent grants) and takes no on=. A
count of 0, a probability outside 0..1, an unknown kind or key: FaultSpecError, one line.

Report ("faults", one entry per --fault in the order given): kind, spec (as written),
trigger (normalised), effect, matched (requests the trigger saw), fired, first (null until
it fires, else {"request": the matching request it fired on, 1-based; "seconds": since the
backend started; "at": UTC time}).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xentools.core.blkif import (
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
)
from xentools.core.errors import XentoolsError

__all__ = ["CONNECT_KINDS", "DATA_KINDS", "GRANT_KINDS", "KINDS", "RESPONSE_KINDS", "FaultSet", "FaultSpec",
           "FaultSpecError", "parse_fault", "parse_faults"]

# kind -> what the guest is told (the --help text lists these).
RESPONSE_KINDS: dict[str, str] = {
    "unknown-id": "the response carries an id no request has",
    "duplicate": "another request's response is sent twice in one push, the second in place of this one's",
    "unsolicited": "after this response, one more in a slot the frontend never filled (rsp_prod passes req_prod); "
                   "that ring then serves nothing more",
    "wrong-op": "the response names another operation than the request's",
    "bad-status": "the response's status is 2, not OKAY/ERROR/EOPNOTSUPP",
    "error": "a valid request is answered ERROR (after it was carried out)",
    "silent": "the request is never answered",
    "late": "the answer is held back delay=S seconds (the ring stalls meanwhile)",
    "rsp-overrun": "rsp_prod is published more than a ring ahead of req_prod, again after every later push",
    "storm": "10000 event notifications after the response",
    "closing": "the backend goes to Closing (error node written) with requests in flight",
}
DATA_KINDS: dict[str, str] = {
    "read-no-data": "a READ is answered OKAY without its data written into the guest's pages",
    "corrupt-read": "a READ is answered OKAY with one byte of every 512 flipped (the image is untouched)",
}
GRANT_KINDS: dict[str, str] = {
    "keep-mapped": "a request's grants (non-persistent) stay mapped after its response, for >= 1 s",
}
CONNECT_KINDS: dict[str, str] = {
    "bad-ring-order": "max-ring-page-order 99 is offered",
    "bad-indirect-segments": "feature-max-indirect-segments 4294967295 is offered",
    "bad-queues": "multi-queue-max-queues 0 is offered",
    "bad-sector-size": "sector-size 513 is published",
    "zero-sectors": "sectors 0 is published",
    "huge-sectors": "sectors 2^64-1 is published",
}
KINDS: dict[str, str] = {**RESPONSE_KINDS, **DATA_KINDS, **GRANT_KINDS, **CONNECT_KINDS}

_OPS = {"read": (BLKIF_OP_READ,), "write": (BLKIF_OP_WRITE,),
        "flush": (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER)}
_STORM_EVENTS = 10000
_BAD_STATUS = 2
_UNKNOWN_ID_BIT = 1 << 63
LINGER = 1.0  # seconds keep-mapped holds a mapping (until the next grant operation after that)
DEFAULT_DELAY = 10.0
# duplicate: seconds an answer is held for another request's answer to pair with it (a
# frontend with one request in flight gets it honestly then, and the fault stays armed), and
# how many holds in vain make it give up on that ring (such a frontend loses at most 8 s).
DUPLICATE_HOLD = 2.0
DUPLICATE_TRIES = 4


class FaultSpecError(XentoolsError):
    """A --fault spec that cannot be used; one line naming the problem and the fix."""


@dataclass(frozen=True)
class FaultSpec:
    """One parsed fault: `trigger` is "first", "after", "every" or "p" with `value`."""

    kind: str
    trigger: str = "first"
    value: float = 0
    on: str | None = None  # "read", "write", "flush" or None for every operation
    delay: float = DEFAULT_DELAY
    text: str = ""

    def describe(self) -> str:
        parts = {"first": "first matching request", "after": f"after={int(self.value)}",
                 "every": f"every={int(self.value)}", "p": f"p={self.value:g}"}[self.trigger]
        if self.on:
            parts += f",on={self.on}"
        if self.kind == "late":
            parts += f",delay={self.delay:g}"
        return parts


def _count(key: str, raw: str, spec: str) -> int:
    try:
        value = int(raw, 10)
    except ValueError:
        raise FaultSpecError(f"fault {spec!r}: {key}={raw!r} is not a whole number") from None
    if value <= 0:
        raise FaultSpecError(f"fault {spec!r}: {key}={value}: the count must be at least 1")
    return value


def parse_fault(spec: str) -> FaultSpec:
    """Parse one KIND[:TRIGGER,...] spec (grammar in the module docstring); pure."""
    text = spec.strip()
    kind, colon, rest = text.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise FaultSpecError(
            f"fault {spec!r}: unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}"
        )
    fields: dict[str, Any] = {"kind": kind, "text": text}
    if not rest.strip():
        if colon:
            raise FaultSpecError(f"fault {spec!r}: nothing after ':'; give a trigger (after=N, every=N, p=X, on=OP)")
        return FaultSpec(**fields)
    if kind in CONNECT_KINDS:
        raise FaultSpecError(f"fault {spec!r}: {kind} happens at connect and takes no trigger; write just {kind}")
    seen: set[str] = set()
    for item in rest.split(","):
        key, eq, raw = item.strip().partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not raw:
            raise FaultSpecError(f"fault {spec!r}: {item.strip()!r} is not KEY=VALUE (after=N, every=N, p=X, on=OP)")
        if key in seen:
            raise FaultSpecError(f"fault {spec!r}: {key} given twice")
        seen.add(key)
        if key in ("after", "every"):
            fields["value"] = _count(key, raw, spec)
        elif key == "p":
            try:
                value = float(raw)
            except ValueError:
                raise FaultSpecError(f"fault {spec!r}: p={raw!r} is not a number") from None
            if not 0.0 <= value <= 1.0:  # NaN fails this too
                raise FaultSpecError(f"fault {spec!r}: p={raw} is outside 0..1")
            fields["value"] = value
        elif key == "on":
            if kind in GRANT_KINDS:
                raise FaultSpecError(f"fault {spec!r}: {kind} counts mappings, not operations; drop on=")
            if raw not in _OPS:
                raise FaultSpecError(f"fault {spec!r}: on={raw!r}; give on=read, on=write or on=flush")
            if kind in DATA_KINDS and raw != "read":
                raise FaultSpecError(f"fault {spec!r}: {kind} changes READ data; on={raw} would never fire")
            fields["on"] = raw
        elif key == "delay" and kind == "late":
            try:
                delay = float(raw)
            except ValueError:
                raise FaultSpecError(f"fault {spec!r}: delay={raw!r} is not a number of seconds") from None
            if not 0.0 < delay <= 86400.0:
                raise FaultSpecError(f"fault {spec!r}: delay={raw} is outside (0, 86400] seconds")
            fields["delay"] = delay
        else:
            allowed = "after, every, p, on" + (", delay" if kind == "late" else "")
            raise FaultSpecError(f"fault {spec!r}: unknown trigger key {key!r}; valid keys: {allowed}")
        if key in ("after", "every", "p"):
            if "trigger" in fields:
                raise FaultSpecError(f"fault {spec!r}: give one of after=, every=, p=, not several")
            fields["trigger"] = key
    return FaultSpec(**fields)


def parse_faults(specs: Sequence[str]) -> tuple[FaultSpec, ...]:
    """Every --fault, parsed; the first bad one raises FaultSpecError."""
    return tuple(parse_fault(spec) for spec in specs)


def help_text() -> str:
    """The --fault option's help (one paragraph)."""
    return ("Misbehave on purpose (repeatable): SPEC is KIND[:TRIGGER,...]; see FAULTS below. "
            "The image file is never changed by a fault, only what the guest is told.")


def help_epilog() -> str:
    """The grammar and every kind, one per line (click keeps \\b paragraphs as written)."""
    lines = [
        "\b",
        "FAULTS (--fault KIND[:TRIGGER,...]):",
        "  after=N   N matching requests served honestly, then fire once",
        "  every=N   fire on every Nth matching request",
        "  p=X       fire with probability X (0..1; seeded, repeatable)",
        "  on=read|write|flush   only requests of that operation match",
        f"  delay=S   late only: seconds held back (default {DEFAULT_DELAY:g})",
        "  A bare KIND fires once, on the first matching request;",
        "  connect kinds (the last six) take no trigger.",
        "  e.g. --fault unknown-id:every=5,on=read --fault late:after=100,delay=60",
        "",
        "\b",
        "Kinds:",
    ]
    lines += [f"  {kind:<22} {what}" for kind, what in KINDS.items()]
    return "\n".join(lines)


class _Fault:
    """One fault's trigger and counts (any thread)."""

    def __init__(self, spec: FaultSpec, seed: int, started: float) -> None:
        self.spec = spec
        self.ops = _OPS[spec.on] if spec.on else None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._started = started
        self.seen = 0  # matching requests
        self.fired = 0
        self.first: dict[str, Any] | None = None
        self.armed_at = 0  # the matching request that armed a fault counted only when sent

    def fires(self, op: int, count: bool = True) -> bool:
        """Whether the fault fires on this request; one call per request. Counted as fired
        unless `count` is false (duplicate: counted by `sent`, when it really is sent)."""
        if self.ops is not None and op not in self.ops:
            return False
        spec = self.spec
        with self._lock:
            self.seen += 1
            n = self.seen
            if spec.trigger == "first":
                hit = not self.fired and not self.armed_at
            elif spec.trigger == "after":
                hit = n == spec.value + 1
            elif spec.trigger == "every":
                hit = n % spec.value == 0
            else:
                hit = self._rng.random() < spec.value
            if hit and count:
                self.record(n)
            elif hit:
                self.armed_at = self.armed_at or n
            return hit

    def sent(self) -> None:
        """An armed fault (fires with count=False) took effect: counted as fired on the
        request that armed it."""
        with self._lock:
            self.record(self.armed_at or self.seen)
            self.armed_at = 0

    def record(self, request: int) -> None:
        """Count one firing (the caller holds the lock, or is at connect)."""
        self.fired += 1
        if self.first is None:
            self.first = {
                "request": request,
                "seconds": round(time.monotonic() - self._started, 3),
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"kind": self.spec.kind, "spec": self.spec.text, "trigger": self.spec.describe(),
                    "effect": KINDS[self.spec.kind], "matched": self.seen, "fired": self.fired,
                    "first": self.first}


class _FaultyImage:
    """The image as a queue sees it: READ data may be withheld or flipped after the read;
    everything else (writes, flush, discard) goes straight to the real image."""

    def __init__(self, image: Any, faults: list[_Fault]) -> None:
        self._image = image
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._image, name)

    def try_readv(self, buffers: Sequence[memoryview], offset: int, total: int) -> bool:
        return False  # every READ goes through readv, so each is judged exactly once

    def readv(self, buffers: Sequence[memoryview], offset: int, total: int = -1) -> None:
        kinds = {fault.spec.kind for fault in self._faults if fault.fires(BLKIF_OP_READ)}
        if "read-no-data" in kinds:
            return  # the guest's pages keep whatever they held
        self._image.readv(buffers, offset, total)
        if "corrupt-read" in kinds:
            for view in buffers:
                for at in range(0, len(view), 512):
                    view[at] ^= 0xFF


class _LingeringMapper:
    """A queue's SegmentMapper whose temporary mappings may outlive their response
    (keep-mapped): held for LINGER seconds, then unmapped at the next grant operation, or
    at close."""

    def __init__(self, mapper: Any, fault: _Fault) -> None:
        self._mapper = mapper
        self._fault = fault
        self._held: list[tuple[float, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mapper, name)

    def _expire(self, everything: bool = False) -> None:
        now = time.monotonic()
        while self._held and (everything or self._held[0][0] <= now):
            _, mapped = self._held.pop(0)
            self._mapper.unmap(mapped)  # the same gnttab unmap as a map_many mapping

    def map(self, grefs: Sequence[int], writable: bool) -> Any:
        self._expire()
        return self._mapper.map(grefs, writable)

    def map_many(self, requests: Sequence[Sequence[int]], writable: bool) -> Any:
        self._expire()
        return self._mapper.map_many(requests, writable)

    def release(self, pages: Any) -> None:
        if pages.temporary and self._fault.fires(BLKIF_OP_READ):
            until = time.monotonic() + LINGER
            self._held.extend((until, mapped) for mapped in pages.temporary)
            pages.temporary = []
        self._mapper.release(pages)
        self._expire()

    def unmap(self, mapped: Any) -> None:
        if self._fault.fires(BLKIF_OP_READ):
            self._held.append((time.monotonic() + LINGER, mapped))
        else:
            self._mapper.unmap(mapped)
        self._expire()

    def close(self) -> None:
        try:
            self._expire(everything=True)
        finally:
            self._mapper.close()


class FaultSet:
    """Every --fault of one backend; consulted at the FAULT HOOKs of blkback and its queues."""

    def __init__(self, specs: Sequence[FaultSpec], seed: int = 0x5EED) -> None:
        started = time.monotonic()
        self.faults = [_Fault(spec, seed + index, started) for index, spec in enumerate(specs)]
        self._response = [f for f in self.faults if f.spec.kind in RESPONSE_KINDS]
        self._data = [f for f in self.faults if f.spec.kind in DATA_KINDS]
        self._connect = [f for f in self.faults if f.spec.kind in CONNECT_KINDS]
        self._grant = [f for f in self.faults if f.spec.kind in GRANT_KINDS]
        self._previous: dict[int, tuple[int, int, int]] = {}  # ring id -> last answer written
        self._duplicate = next((f for f in self._response if f.spec.kind == "duplicate"), None)
        self._armed: set[int] = set()  # rings where duplicate waits for two answers in one push
        # ring id -> (the answer duplicate holds back, when it is answered honestly instead)
        self._held: dict[int, tuple[tuple[int, int, int], float]] = {}
        self._held_in_vain: dict[int, int] = {}  # ring id -> holds that found no partner
        self._after: dict[int, list[str]] = {}  # ring id -> faults to apply after publishing
        self._pending_unsolicited: set[int] = set()
        self._overrun: set[int] = set()  # rings whose rsp_prod stays broken
        self._halted: set[int] = set()  # rings past an unsolicited response: nothing more is served
        # Set by the backend: asks it to close the device with this message (any thread).
        self.closing: Callable[[str], None] | None = None

    def __bool__(self) -> bool:
        return bool(self.faults)

    # -- FAULT HOOK: responses -------------------------------------------------------------------

    def responses(self, ring: int, answers: list[tuple[int, int, int]],
                  stop: threading.Event) -> list[tuple[int, int, int]]:
        """The answers (id, operation, status) to write on ring `ring` instead of `answers`.
        Ring thread only (one per ring); `stop` cuts a late answer's wait short. With
        duplicate armed, an empty `answers` may still give one (see `due`)."""
        if not self._response:
            return answers
        out: list[tuple[int, int, int]] = []
        for answer in answers:
            req_id, op, status = answer
            kinds = {fault.spec.kind for fault in self._response
                     if fault.fires(op, count=fault is not self._duplicate)}
            if "duplicate" in kinds:
                self._armed.add(ring)
            if not kinds and not (ring in self._armed and ring not in self._held):
                out.append(answer)
                self._remember(ring, answer)
                continue
            if "silent" in kinds:
                continue
            if "late" in kinds:
                delay = max(f.spec.delay for f in self._response if f.spec.kind == "late")
                stop.wait(delay)
            if "error" in kinds:
                status = BLKIF_RSP_ERROR
            if "bad-status" in kinds:
                status = _BAD_STATUS
            if "wrong-op" in kinds:
                op ^= 1  # READ<->WRITE, FLUSH->BARRIER...: never the request's own
            if "unknown-id" in kinds:
                req_id ^= _UNKNOWN_ID_BIT
            answer = (req_id, op, status)
            if "closing" in kinds and self.closing is not None:
                self.closing(f"fault closing: the backend leaves Connected mid-I/O (--fault {self._spec('closing')})")
            if "unsolicited" in kinds:
                self._pending_unsolicited.add(ring)
            for kind in ("rsp-overrun", "storm"):
                if kind in kinds:
                    self._after.setdefault(ring, []).append(kind)
            if ring in self._armed and ring not in self._held:
                self._held[ring] = (answer, time.monotonic() + DUPLICATE_HOLD)
                continue
            out.append(answer)
            self._remember(ring, answer)
        self._pair_duplicate(ring, out, stop)
        return out

    def _pair_duplicate(self, ring: int, out: list[tuple[int, int, int]], stop: threading.Event) -> None:
        """duplicate, armed on `ring`: the held answer's place goes to a second copy of an
        answer of this same push with another id, after it. Only within one push is the
        copy a duplicate for every frontend: the frontend reads both from one rsp_prod, so it
        cannot have given that id to a new request in between (Linux's free list hands the
        id just freed out first). With no such answer, the held one waits (DUPLICATE_HOLD
        seconds) for another request's answer; then it is answered honestly, still armed
        (DUPLICATE_TRIES times at most on a ring)."""
        held = self._held.get(ring)
        if held is None:
            return
        answer, until = held
        partner = next((old for old in reversed(out) if old[0] != answer[0]), None)
        if partner is not None:
            out.append(partner)
            self._remember(ring, partner)
            del self._held[ring]
            self._armed.discard(ring)
            self._held_in_vain.pop(ring, None)
            assert self._duplicate is not None
            self._duplicate.sent()
        elif stop.is_set() or time.monotonic() >= until:
            out.append(answer)
            self._remember(ring, answer)
            del self._held[ring]
            tries = self._held_in_vain[ring] = self._held_in_vain.get(ring, 0) + 1
            if stop.is_set() or tries >= DUPLICATE_TRIES:  # gives up here: never fired
                self._armed.discard(ring)
                self._held_in_vain.pop(ring, None)

    def due(self, ring: int) -> bool:
        """Whether ring `ring` holds an answer back that must be published now (its
        DUPLICATE_HOLD passed): the queue then publishes even with no answer of its own."""
        held = self._held.get(ring)
        return held is not None and time.monotonic() >= held[1]

    def halted(self, ring: int) -> bool:
        """Whether ring `ring` serves nothing more (it sent an unsolicited response)."""
        return ring in self._halted

    def _remember(self, ring: int, answer: tuple[int, int, int]) -> None:
        self._previous[ring] = answer

    def _spec(self, kind: str) -> str:
        return next(f.spec.text for f in self.faults if f.spec.kind == kind)

    def push(self, ring: int, back: Any, pack: Callable[[int, int, int], bytes],
             notify: Callable[[], None]) -> None:
        """Publish the responses written on ring `ring` (its BackRing `back`) and notify as
        the honest path does (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY), misbehaving around it.
        Ring thread only."""
        fake = False
        if ring in self._pending_unsolicited and ring in self._previous:
            # One more response, in slot rsp_prod_pvt, only while the frontend has not filled
            # it: every request it produced is consumed and answered (else on a later push).
            # Written past the private producer's check (put_response refuses it) and
            # published with the others. That slot is the frontend's next request's: it may
            # be writing there already, and a rewound producer would answer that request in
            # the same slot, under the same rsp_prod, maybe before the frontend read the
            # fake (which then never existed for it). So the ring stops here (`halted`): the
            # frontend reads in that slot the fake, or its own request, never an honest answer,
            # and a request of its that the fake overwrote is never taken for its own.
            pvt = back.rsp_prod_pvt
            if back.req_cons == back.shared.req_prod == pvt:
                self._pending_unsolicited.discard(ring)
                req_id, op, _ = self._previous[ring]
                back.shared.write_slot(pvt, pack(req_id, op, BLKIF_RSP_OKAY))
                back.rsp_prod_pvt = pvt + 1
                self._halted.add(ring)
                fake = True
        if back.push_responses_and_check_notify() or fake:
            notify()
        kinds = self._after.pop(ring, None) or []
        if "rsp-overrun" in kinds:
            self._overrun.add(ring)
        shared = back.shared
        if ring in self._overrun:
            # The private producer stays right, but from now on every push ends with the bad
            # rsp_prod (else a fast frontend could read only the honest one before it).
            shared.rsp_prod = (shared.req_prod + shared.nr_ents + 1) & 0xFFFFFFFF
            notify()
        if "storm" in kinds:
            for _ in range(_STORM_EVENTS):
                notify()

    # -- FAULT HOOK: read data ---------------------------------------------------------------------

    def image(self, image: Any) -> Any:
        """The image a queue should use: the real one unless a data fault is set."""
        return _FaultyImage(image, self._data) if self._data else image

    # -- FAULT HOOK: grant mappings --------------------------------------------------------------------

    def mapper(self, mapper: Any) -> Any:
        """The SegmentMapper a queue should use: the real one unless keep-mapped is set."""
        return _LingeringMapper(mapper, self._grant[0]) if self._grant else mapper

    # -- FAULT HOOK: connect -------------------------------------------------------------------------

    def feature_keys(self, keys: dict[str, str]) -> dict[str, str]:
        """The feature keys to offer instead of `keys`."""
        values = {"bad-ring-order": ("max-ring-page-order", "99"),
                  "bad-indirect-segments": ("feature-max-indirect-segments", "4294967295"),
                  "bad-queues": ("multi-queue-max-queues", "0")}
        return self._replace(keys, values)

    def disk_keys(self, keys: dict[str, str]) -> dict[str, str]:
        """The disk keys (sectors, sector-size) to publish instead of `keys`."""
        values = {"bad-sector-size": ("sector-size", "513"), "zero-sectors": ("sectors", "0"),
                  "huge-sectors": ("sectors", str((1 << 64) - 1))}
        return self._replace(keys, values)

    def _replace(self, keys: dict[str, str], values: dict[str, tuple[str, str]]) -> dict[str, str]:
        out = dict(keys)
        for fault in self._connect:
            change = values.get(fault.spec.kind)
            if change is not None:
                out[change[0]] = change[1]
                with fault._lock:
                    fault.seen += 1
                    fault.record(fault.seen)
        return out

    # -- the report ----------------------------------------------------------------------------------

    def as_dict(self) -> list[dict[str, Any]]:
        """The report's "faults" section: one entry per --fault, in the order given."""
        return [fault.as_dict() for fault in self.faults]
