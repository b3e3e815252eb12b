"""blkif xenstore records: what each side writes under its device directory, and negotiation.

Owns: the frozen records of the blkif handshake (`BackendFeatures`, `DiskInfo`,
`FrontendRingInfo` with its `QueueRing`s, `BackendToolstackKeys`, `FrontendToolstackKeys`),
each with `to_keys()` (relative key -> value string, as written to xenstore) and
`from_keys(keys)` (the reverse, strict); the value parsers they share (`parse_uint`,
`parse_bool`); and `negotiate()`, which turns the backend's offer and the frontend's wishes
into the parameters of one connection.
Must not: read or write xenstore, watch, wait, or decide when a record is read (that is
xenbus.py's table and the device layer's I/O).

Value rules (blkif.h: "All data in the XenStore is stored as strings. Nodes specifying
numeric values are encoded in decimal."), applied by every `from_keys`:
- A number is one or more ASCII digits and nothing else: no sign, no "0x", no whitespace,
  no trailing newline or NUL. Leading zeros are read as decimal. It must fit the key's type
  (u32 unless stated, u64 for `sectors`) and its documented bounds.
- A boolean is exactly "0" or "1" (blkif.h: "Values: 0/1 (boolean)"); an absent key takes
  the default blkif.h gives it (False for every feature-*, True for `discard-enable` and
  `trusted`).
- Values arrive as `str` or `bytes`. Numbers, booleans and enumerations must be ASCII;
  free-form strings (`params`, `physical-device-path`) must be UTF-8 without NUL.
- Keys a record does not know are ignored (a directory holds other records' keys too).
Each failure raises `FeatureError` whose `rule` is "<side>.<key>.<what>": side is the
directory the key lives in ("backend" or "frontend"), key is the xenstore key (for the
numbered keys `ring-ref%u` and `queue-%u/...` the unnumbered name, e.g. "frontend.ring-ref",
with the exact key in the message), what is one of missing, malformed, range, unknown,
count, large. Records also validate on construction with the same rules, so a record that
exists is one that may be written.

When keys are written and read (see xenbus.py for the states):
- A backend publishes `BackendFeatures` before InitWait. Linux blkback writes only
  max-ring-page-order, multi-queue-max-queues and feature-max-indirect-segments that early;
  feature-flush-cache, feature-barrier, feature-discard (+ discard-*) and feature-persistent
  come in its connect(), just before Connected. So a frontend takes the transport parameters
  (ring order, queues) from the record read at InitWait and re-reads `BackendFeatures`
  together with `DiskInfo` at Connected, calling `negotiate()` again for the I/O features.
- A frontend writes `FrontendRingInfo` in one transaction, then Initialised.
- The backend writes `DiskInfo` (and re-writes it with state Connected on resize).
Deprecated keys (max-ring-pages, num-ring-pages) are neither written nor read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from xentools.core.blkif import (
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    VDISK_CDROM,
    VDISK_READONLY,
    VDISK_REMOVABLE,
)
from xentools.core.errors import FeatureError

__all__ = [
    "DOMID_FIRST_RESERVED",
    "MAX_QUEUES",
    "PROTOCOLS",
    "RING_PAGE_ORDER_LIMIT",
    "U32_MAX",
    "U64_MAX",
    "BackendFeatures",
    "BackendToolstackKeys",
    "DiskInfo",
    "FrontendPreferences",
    "FrontendRingInfo",
    "FrontendToolstackKeys",
    "KeyValues",
    "Negotiated",
    "QueueRing",
    "negotiate",
    "parse_bool",
    "parse_uint",
]

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

# The largest ring this core accepts: 2**4 = 16 pages, 512 entries on both ABIs. Linux caps
# its rings at XENBUS_MAX_RING_GRANT_ORDER = 4 too. A frontend's ring-page-order above this
# is refused before any ring-ref%u is looked up, so a hostile order cannot make a parser walk
# 2**32 keys. A backend may advertise more; negotiate() clamps.
RING_PAGE_ORDER_LIMIT = 4

# The most queues this core accepts from a frontend (Linux blkback offers one per online
# CPU; Linux blkfront uses at most 4 by default). Same reason as above: bounds the key walk.
MAX_QUEUES = 256

# domid_t is u16; ids from DOMID_FIRST_RESERVED (xen.h: DOMID_SELF, DOMID_IO, ...) up are
# not domains a device can live in.
DOMID_FIRST_RESERVED = 0x7FF0

# xen/io/protocols.h: the values of the frontend's "protocol" key.
PROTOCOLS = frozenset({"x86_32-abi", "x86_64-abi", "arm-abi"})
_PROTOCOL_LIST = ", ".join(sorted(PROTOCOLS))

KeyValues = Mapping[str, str | bytes]

_DIGITS = frozenset("0123456789")
# xenstore path characters (xenstored's is_valid_nodename): letters, digits and "-/_@".
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-/_@")
_HEX = frozenset("0123456789abcdefABCDEF")


def _show(value: object) -> str:
    """A short one-line rendering of a (possibly hostile) value for a message."""
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _decode(value: object, rule: str, key: str, *, utf8: bool = False) -> str:
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8" if utf8 else "ascii")
        except UnicodeDecodeError:
            kind = "UTF-8" if utf8 else "ASCII"
            raise FeatureError(rule, f"key {key!r} = {_show(value)} is not {kind}") from None
    elif isinstance(value, str):
        text = value
        if not utf8 and not text.isascii():
            raise FeatureError(rule, f"key {key!r} = {_show(value)} is not ASCII")
    else:
        raise FeatureError(rule, f"key {key!r} has a {type(value).__name__}, not str or bytes")
    if "\0" in text:
        raise FeatureError(rule, f"key {key!r} = {_show(value)} contains NUL")
    return text


def parse_uint(
    value: str | bytes,
    rule: str,
    *,
    key: str | None = None,
    minimum: int = 0,
    maximum: int = U32_MAX,
) -> int:
    """Parse one strict decimal number (see the module rules) within [minimum, maximum].

    `rule` is the rule stem, e.g. "backend.sectors": failures raise FeatureError with
    "<rule>.malformed" (not ASCII digits) or "<rule>.range" (outside the bounds).
    """
    key = key if key is not None else rule.rsplit(".", 1)[-1]
    text = _decode(value, f"{rule}.malformed", key)
    if not text or not _DIGITS.issuperset(text):
        raise FeatureError(
            f"{rule}.malformed", f"key {key!r} = {_show(value)} is not a decimal number"
        )
    significant = text.lstrip("0") or "0"
    # Check the length first: int() of a 4 KiB digit string is slow and may be refused.
    if len(significant) > len(str(maximum)):
        raise FeatureError(f"{rule}.range", f"key {key!r} = {_show(value)} is above {maximum}")
    number = int(significant)
    if not minimum <= number <= maximum:
        raise FeatureError(
            f"{rule}.range", f"key {key!r} = {number} is outside {minimum}..{maximum}"
        )
    return number


def parse_bool(value: str | bytes, rule: str, *, key: str | None = None) -> bool:
    """Parse a blkif boolean: exactly "0" or "1", else "<rule>.malformed"."""
    key = key if key is not None else rule.rsplit(".", 1)[-1]
    text = _decode(value, f"{rule}.malformed", key)
    if text == "1":
        return True
    if text == "0":
        return False
    raise FeatureError(f"{rule}.malformed", f"key {key!r} = {_show(value)} is not 0 or 1")


# --- checks used on construction -------------------------------------------------------------


def _check_bool(value: object, rule: str) -> None:
    if not isinstance(value, bool):
        raise FeatureError(f"{rule}.malformed", f"{_show(value)} is not a bool")


def _check_uint(value: object, rule: str, *, minimum: int = 0, maximum: int = U32_MAX) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FeatureError(f"{rule}.malformed", f"{_show(value)} is not an int")
    if not minimum <= value <= maximum:
        # Huge ints are not printed: str() of one with over 4300 digits raises ValueError.
        shown = str(value) if value.bit_length() <= 128 else "a huge number"
        raise FeatureError(f"{rule}.range", f"{shown} is outside {minimum}..{maximum}")


def _check_text(value: object, rule: str) -> None:
    if not isinstance(value, str) or "\0" in value:
        raise FeatureError(f"{rule}.malformed", f"{_show(value)} is not a string without NUL")


def _check_path(value: object, rule: str) -> None:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or value.endswith("/")
        or "//" in value
        or not _PATH_CHARS.issuperset(value)
    ):
        raise FeatureError(f"{rule}.malformed", f"{_show(value)} is not an absolute xenstore path")


def _is_word(text: str) -> bool:
    """An open enumeration value (type, device-type): printable ASCII, no space, not empty."""
    return bool(text) and text.isascii() and text.isprintable() and " " not in text


def _flag(value: bool) -> str:
    return "1" if value else "0"


# --- the generic key codec for flat records ---------------------------------------------------


@dataclass(frozen=True)
class _Key:
    """One xenstore key of a flat record: how it is parsed, checked and formatted."""

    attr: str
    key: str
    kind: str  # "bool", "uint", "choice", "word", "text", "path", "majmin"
    required: bool = False
    minimum: int = 0
    maximum: int = U32_MAX
    choices: tuple[str, ...] = ()
    omit_zero: bool = False  # to_keys leaves the key out when the value is 0

    def parse(self, raw: object, side: str) -> Any:
        rule = f"{side}.{self.key}"
        if self.kind == "bool":
            return parse_bool(raw, rule, key=self.key)  # type: ignore[arg-type]
        if self.kind == "uint":
            return parse_uint(
                raw,  # type: ignore[arg-type]
                rule,
                key=self.key,
                minimum=self.minimum,
                maximum=self.maximum,
            )
        if self.kind == "majmin":
            return _parse_major_minor(raw, rule, self.key)
        text = _decode(raw, f"{rule}.malformed", self.key, utf8=self.kind == "text")
        if self.kind == "choice" and text not in self.choices:
            raise FeatureError(
                f"{rule}.unknown",
                f"key {self.key!r} = {_show(text)} is not one of {', '.join(self.choices)}",
            )
        if self.kind == "word" and not _is_word(text):
            raise FeatureError(
                f"{rule}.malformed", f"key {self.key!r} = {_show(text)} is not a word"
            )
        if self.kind == "path":
            _check_path(text, rule)
        return text

    def check(self, value: object, side: str) -> None:
        rule = f"{side}.{self.key}"
        if value is None and not self.required:
            return
        if self.kind == "bool":
            _check_bool(value, rule)
        elif self.kind == "uint":
            _check_uint(value, rule, minimum=self.minimum, maximum=self.maximum)
        elif self.kind == "choice":
            if value not in self.choices:
                raise FeatureError(
                    f"{rule}.unknown", f"{_show(value)} is not one of {', '.join(self.choices)}"
                )
        elif self.kind == "word":
            if not isinstance(value, str) or not _is_word(value):
                raise FeatureError(f"{rule}.malformed", f"{_show(value)} is not a word")
        elif self.kind == "text":
            _check_text(value, rule)
        elif self.kind == "path":
            _check_path(value, rule)
        elif self.kind == "majmin":
            if not (isinstance(value, tuple) and len(value) == 2):
                raise FeatureError(f"{rule}.malformed", f"{_show(value)} is not (major, minor)")
            for part in value:
                _check_uint(part, rule)

    def format(self, value: Any) -> str | None:
        if value is None or (self.omit_zero and value == 0):
            return None
        if self.kind == "bool":
            return _flag(value)
        if self.kind == "uint":
            return str(value)
        if self.kind == "majmin":
            return f"{value[0]:x}:{value[1]:x}"
        return str(value)


def _parse_major_minor(raw: object, rule: str, key: str) -> tuple[int, int]:
    # blkif.h only says "MAJOR:MINOR"; Linux blkback reads it with "%x:%x" and the hotplug
    # scripts write it in hex, so this one key is hexadecimal.
    text = _decode(raw, f"{rule}.malformed", key)
    major, sep, minor = text.partition(":")
    if (
        not sep
        or not major
        or not minor
        or not _HEX.issuperset(major + minor)
        or len(major) > 8
        or len(minor) > 8
    ):
        raise FeatureError(
            f"{rule}.malformed", f"key {key!r} = {_show(raw)} is not hex MAJOR:MINOR"
        )
    return int(major, 16), int(minor, 16)


class _FlatRecord:
    """Mixin for records whose keys map one-to-one onto dataclass fields."""

    _SIDE: ClassVar[str]
    _KEYS: ClassVar[tuple[_Key, ...]]

    def _check_keys(self) -> None:
        for spec in self._KEYS:
            spec.check(getattr(self, spec.attr), self._SIDE)

    def to_keys(self) -> dict[str, str]:
        """The keys of this record, relative to its device directory, as xenstore strings."""
        out: dict[str, str] = {}
        for spec in self._KEYS:
            text = spec.format(getattr(self, spec.attr))
            if text is not None:
                out[spec.key] = text
        return out

    @classmethod
    def from_keys(cls, keys: KeyValues) -> Any:
        """Parse the record from a device directory's keys; FeatureError names the bad key."""
        if not isinstance(keys, Mapping):
            raise FeatureError(
                f"{cls._SIDE}.keys.malformed", f"{type(keys).__name__} is not a mapping"
            )
        values: dict[str, Any] = {}
        for spec in cls._KEYS:
            raw = keys.get(spec.key)
            if raw is None:
                if spec.required:
                    raise FeatureError(
                        f"{cls._SIDE}.{spec.key}.missing", f"key {spec.key!r} is missing"
                    )
                continue  # the dataclass default is blkif.h's default
            values[spec.attr] = spec.parse(raw, cls._SIDE)
        return cls(**values)


# --- backend records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendFeatures(_FlatRecord):
    """What the backend offers, from its directory (blkif.h "Features" and "Request
    Transport Parameters"). Every key is optional; absent keys take blkif.h's defaults.

    `feature_max_indirect_segments` 0 means the key is absent: blkif.h says a backend that
    does not recognise BLKIF_OP_INDIRECT must not create it. `discard_granularity` None
    means "sector-size" and `discard_alignment` None means 0 (blkif.h note 4).
    """

    feature_flush_cache: bool = False
    feature_barrier: bool = False
    feature_discard: bool = False
    discard_granularity: int | None = None
    discard_alignment: int | None = None
    discard_secure: bool = False
    feature_persistent: bool = False
    feature_max_indirect_segments: int = 0
    max_ring_page_order: int = 0
    multi_queue_max_queues: int = 1

    _SIDE: ClassVar[str] = "backend"
    _KEYS: ClassVar[tuple[_Key, ...]] = (
        _Key("feature_flush_cache", "feature-flush-cache", "bool"),
        _Key("feature_barrier", "feature-barrier", "bool"),
        _Key("feature_discard", "feature-discard", "bool"),
        _Key("discard_granularity", "discard-granularity", "uint"),
        _Key("discard_alignment", "discard-alignment", "uint"),
        _Key("discard_secure", "discard-secure", "bool"),
        _Key("feature_persistent", "feature-persistent", "bool"),
        _Key(
            "feature_max_indirect_segments", "feature-max-indirect-segments", "uint", omit_zero=True
        ),
        _Key("max_ring_page_order", "max-ring-page-order", "uint"),
        # blkif.h: the frontend's count "must be greater than zero, and no more than" this,
        # so a backend offering 0 queues offers nothing a frontend could use.
        _Key("multi_queue_max_queues", "multi-queue-max-queues", "uint", minimum=1),
    )

    def __post_init__(self) -> None:
        self._check_keys()


@dataclass(frozen=True)
class DiskInfo(_FlatRecord):
    """The disk as the backend describes it before Connected (and again on resize).

    `sectors` is required and counts units of `sector_size` (blkif.h). `info` and
    `sector-size` have no default in blkif.h; this core reads their absence as 0 and 512
    (old backends), but `to_keys` always writes all three, since Linux blkfront requires
    them. `physical_sector_size` None means "sector-size". blkif.h also asks that
    sectors * sector-size be a multiple of physical-sector-size; that is not enforced here,
    because Linux blkback writes the device's physical block size whatever the disk's size.
    """

    sectors: int
    info: int = 0
    sector_size: int = 512
    physical_sector_size: int | None = None

    _SIDE: ClassVar[str] = "backend"
    _KEYS: ClassVar[tuple[_Key, ...]] = (
        _Key("sectors", "sectors", "uint", required=True, maximum=U64_MAX),
        _Key("info", "info", "uint"),
        _Key("sector_size", "sector-size", "uint"),
        _Key("physical_sector_size", "physical-sector-size", "uint"),
    )

    def __post_init__(self) -> None:
        self._check_keys()
        # blkif.h: "This must be a power of two with a minimum value of 512."
        size = self.sector_size
        if size < 512 or size & (size - 1):
            raise FeatureError("backend.sector-size.range", f"{size} is not a power of two >= 512")
        physical = self.physical_sector_size
        # blkif.h: "This must be an integer multiple of sector-size."
        if physical is not None and (physical == 0 or physical % size):
            raise FeatureError(
                "backend.physical-sector-size.range",
                f"{physical} is not a multiple of sector-size {size}",
            )

    @property
    def cdrom(self) -> bool:
        return bool(self.info & VDISK_CDROM)

    @property
    def removable(self) -> bool:
        return bool(self.info & VDISK_REMOVABLE)

    @property
    def readonly(self) -> bool:
        return bool(self.info & VDISK_READONLY)

    @property
    def size_bytes(self) -> int:
        return self.sectors * self.sector_size

    def validate(self, *, feature_large_sector_size: bool) -> None:
        """Check the disk against what the frontend said it can handle.

        blkif.h: sector-size "must be set to 512, unless the frontend advertizes a non-zero
        value in its feature-large-sector-size xenbus node". Raises
        "backend.sector-size.large" otherwise.
        """
        if self.sector_size != 512 and not feature_large_sector_size:
            raise FeatureError(
                "backend.sector-size.large",
                f"sector-size {self.sector_size} needs the frontend's feature-large-sector-size",
            )


@dataclass(frozen=True)
class BackendToolstackKeys(_FlatRecord):
    """What the toolstack writes into the backend directory (blkif.h "Backend Device
    Identification", PRIVATE to the backend, plus online and discard-enable).

    `physical_device` is (major, minor) and written in hex "%x:%x", as Linux blkback reads
    it. `online` absent is False (Linux xenbus_dev_is_online); `discard_enable` absent is
    True (blkif.h). `mode` lives here, not in BackendFeatures: it is private to the backend,
    and a frontend learns read-only from DiskInfo.info (VDISK_READONLY).
    """

    params: str
    type: str
    mode: str
    frontend: str
    frontend_id: int
    physical_device: tuple[int, int] | None = None
    physical_device_path: str | None = None
    online: bool = False
    discard_enable: bool = True

    _SIDE: ClassVar[str] = "backend"
    _KEYS: ClassVar[tuple[_Key, ...]] = (
        _Key("params", "params", "text", required=True),
        # blkif.h lists "file", "phy", "tap"; toolstacks also write others (libxl: "qdisk",
        # "vbd3"), so any ASCII word is accepted.
        _Key("type", "type", "word", required=True),
        _Key("mode", "mode", "choice", required=True, choices=("r", "w")),
        _Key("frontend", "frontend", "path", required=True),
        _Key("frontend_id", "frontend-id", "uint", required=True, maximum=DOMID_FIRST_RESERVED - 1),
        _Key("physical_device", "physical-device", "majmin"),
        _Key("physical_device_path", "physical-device-path", "text"),
        _Key("online", "online", "bool"),
        _Key("discard_enable", "discard-enable", "bool"),
    )

    def __post_init__(self) -> None:
        self._check_keys()

    @property
    def readonly(self) -> bool:
        return self.mode == "r"


@dataclass(frozen=True)
class FrontendToolstackKeys(_FlatRecord):
    """What the toolstack writes into the frontend directory.

    `virtual_device` is the xen-vbd-interface(7) number (see vbd.py); `device_type` absent
    is "disk"; `trusted` absent is True (blkif.h: "0" tells the frontend not to trust the
    backend).
    """

    backend: str
    backend_id: int
    virtual_device: int
    device_type: str = "disk"
    trusted: bool = True

    _SIDE: ClassVar[str] = "frontend"
    _KEYS: ClassVar[tuple[_Key, ...]] = (
        _Key("backend", "backend", "path", required=True),
        _Key("backend_id", "backend-id", "uint", required=True, maximum=DOMID_FIRST_RESERVED - 1),
        _Key("virtual_device", "virtual-device", "uint", required=True),
        # blkif.h: "disk", "cdrom", "floppy", etc.: an open set of ASCII words.
        _Key("device_type", "device-type", "word"),
        _Key("trusted", "trusted", "bool"),
    )

    def __post_init__(self) -> None:
        self._check_keys()


# --- frontend ring record ---------------------------------------------------------------------


@dataclass(frozen=True)
class QueueRing:
    """One request ring of a frontend: the grant refs of its pages, in page order, and its
    event channel. A single-page ring has one ref."""

    ring_refs: tuple[int, ...]
    event_channel: int

    def __post_init__(self) -> None:
        if not isinstance(self.ring_refs, tuple):
            if isinstance(self.ring_refs, Sequence) and not isinstance(
                self.ring_refs, (str, bytes)
            ):
                object.__setattr__(self, "ring_refs", tuple(self.ring_refs))
            else:
                raise FeatureError(
                    "frontend.ring-ref.malformed",
                    f"{_show(self.ring_refs)} is not a sequence of refs",
                )
        count = len(self.ring_refs)
        if count == 0 or count & (count - 1) or count > 1 << RING_PAGE_ORDER_LIMIT:
            raise FeatureError(
                "frontend.ring-ref.count",
                f"{count} ring pages is not a power of two up to {1 << RING_PAGE_ORDER_LIMIT}",
            )
        for ref in self.ring_refs:
            _check_uint(ref, "frontend.ring-ref")  # grant_ref_t is u32
        _check_uint(self.event_channel, "frontend.event-channel")  # evtchn_port_t is u32


@dataclass(frozen=True)
class FrontendRingInfo:
    """The transport parameters a frontend writes (in one transaction) before Initialised.

    Key layout (blkif.h, "ring-ref" note 6 and "Multiple hardware queues/rings"):
    - `ring_page_order` None: no ring-page-order key, one page per ring, key `ring-ref`.
      Otherwise `ring-page-order` = order and keys `ring-ref0` .. `ring-ref{2**order-1}`
      (even for order 0, as Linux blkback then reads ring-ref0).
    - One queue: `event-channel` and the ring-ref keys at top level, no
      multi-queue-num-queues (Linux blkfront's choice; "multi-queue-num-queues" = "1" with
      top-level keys is accepted when read). Two or more: `multi-queue-num-queues` = N and
      the keys under `queue-0/` .. `queue-{N-1}/` instead; top-level ones are then ignored.
    - `protocol` None: the key is absent (the backend assumes its native ABI).
    """

    queues: tuple[QueueRing, ...]
    ring_page_order: int | None = None
    protocol: str | None = None
    feature_persistent: bool = False
    feature_large_sector_size: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.queues, tuple):
            if isinstance(self.queues, Sequence):
                object.__setattr__(self, "queues", tuple(self.queues))
            else:
                raise FeatureError(
                    "frontend.multi-queue-num-queues.malformed",
                    f"{_show(self.queues)} is not a sequence",
                )
        if not 1 <= len(self.queues) <= MAX_QUEUES:
            raise FeatureError(
                "frontend.multi-queue-num-queues.range",
                f"{len(self.queues)} queues is outside 1..{MAX_QUEUES}",
            )
        for queue in self.queues:
            if not isinstance(queue, QueueRing):
                raise FeatureError(
                    "frontend.multi-queue-num-queues.malformed",
                    f"{_show(queue)} is not a QueueRing",
                )
        if self.ring_page_order is not None:
            _check_uint(
                self.ring_page_order, "frontend.ring-page-order", maximum=RING_PAGE_ORDER_LIMIT
            )
        pages = self.ring_pages
        for index, queue in enumerate(self.queues):
            if len(queue.ring_refs) != pages:
                raise FeatureError(
                    "frontend.ring-ref.count",
                    f"queue {index} has {len(queue.ring_refs)} ring refs, "
                    f"ring-page-order says {pages}",
                )
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise FeatureError(
                "frontend.protocol.unknown",
                f"{_show(self.protocol)} is not one of {_PROTOCOL_LIST}",
            )
        _check_bool(self.feature_persistent, "frontend.feature-persistent")
        _check_bool(self.feature_large_sector_size, "frontend.feature-large-sector-size")

    @property
    def order(self) -> int:
        return self.ring_page_order or 0

    @property
    def ring_pages(self) -> int:
        return 1 << self.order

    @property
    def num_queues(self) -> int:
        return len(self.queues)

    def _queue_dirs(self) -> list[str]:
        if len(self.queues) == 1:
            return [""]
        return [f"queue-{index}/" for index in range(len(self.queues))]

    def _ref_keys(self) -> list[str]:
        if self.ring_page_order is None:
            return ["ring-ref"]
        return [f"ring-ref{index}" for index in range(self.ring_pages)]

    def to_keys(self) -> dict[str, str]:
        """The keys, relative to the frontend directory ("queue-K/..." for multi-queue)."""
        out: dict[str, str] = {}
        if self.ring_page_order is not None:
            out["ring-page-order"] = str(self.ring_page_order)
        if len(self.queues) > 1:
            out["multi-queue-num-queues"] = str(len(self.queues))
        ref_keys = self._ref_keys()
        for prefix, queue in zip(self._queue_dirs(), self.queues, strict=True):
            for key, ref in zip(ref_keys, queue.ring_refs, strict=True):
                out[prefix + key] = str(ref)
            out[prefix + "event-channel"] = str(queue.event_channel)
        if self.protocol is not None:
            out["protocol"] = self.protocol
        out["feature-persistent"] = _flag(self.feature_persistent)
        out["feature-large-sector-size"] = _flag(self.feature_large_sector_size)
        return out

    @classmethod
    def from_keys(cls, keys: KeyValues) -> FrontendRingInfo:
        """Parse the frontend's transport parameters. Bounds that depend on the backend's
        offer are checked by `validate()`; here only this core's ceilings apply."""
        if not isinstance(keys, Mapping):
            raise FeatureError("frontend.keys.malformed", f"{type(keys).__name__} is not a mapping")

        def required_uint(key: str, rule: str) -> int:
            raw = keys.get(key)
            if raw is None:
                raise FeatureError(f"{rule}.missing", f"key {key!r} is missing")
            return parse_uint(raw, rule, key=key)

        order: int | None = None
        raw = keys.get("ring-page-order")
        if raw is not None:
            order = parse_uint(raw, "frontend.ring-page-order", maximum=RING_PAGE_ORDER_LIMIT)
        count = 1
        raw = keys.get("multi-queue-num-queues")
        if raw is not None:
            # blkif.h: "must be greater than zero".
            count = parse_uint(
                raw, "frontend.multi-queue-num-queues", minimum=1, maximum=MAX_QUEUES
            )
        ref_keys = ["ring-ref"] if order is None else [f"ring-ref{i}" for i in range(1 << order)]
        dirs = [""] if count == 1 else [f"queue-{index}/" for index in range(count)]
        queues = []
        for prefix in dirs:
            refs = tuple(required_uint(prefix + key, "frontend.ring-ref") for key in ref_keys)
            channel = required_uint(prefix + "event-channel", "frontend.event-channel")
            queues.append(QueueRing(refs, channel))
        protocol: str | None = None
        raw = keys.get("protocol")
        if raw is not None:
            protocol = _decode(raw, "frontend.protocol.malformed", "protocol")
            if protocol not in PROTOCOLS:
                raise FeatureError(
                    "frontend.protocol.unknown",
                    f"key 'protocol' = {_show(protocol)} is not one of {_PROTOCOL_LIST}",
                )
        flags = {}
        for attr, key in (
            ("feature_persistent", "feature-persistent"),
            ("feature_large_sector_size", "feature-large-sector-size"),
        ):
            raw = keys.get(key)
            if raw is not None:
                flags[attr] = parse_bool(raw, f"frontend.{key}", key=key)
        return cls(tuple(queues), order, protocol, **flags)

    def validate(self, *, max_ring_page_order: int, max_queues: int) -> None:
        """Check the frontend's choice against the backend's offer (BackendFeatures
        max_ring_page_order and multi_queue_max_queues): "frontend.ring-page-order.range" or
        "frontend.multi-queue-num-queues.range" if it asks for more than was offered."""
        if self.order > max_ring_page_order:
            raise FeatureError(
                "frontend.ring-page-order.range",
                f"ring-page-order {self.order} is above the backend's "
                f"max-ring-page-order {max_ring_page_order}",
            )
        if len(self.queues) > max_queues:
            raise FeatureError(
                "frontend.multi-queue-num-queues.range",
                f"{len(self.queues)} queues is above the backend's "
                f"multi-queue-max-queues {max_queues}",
            )


# --- negotiation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontendPreferences:
    """What a frontend would like; negotiate() cuts it down to what the backend offers.

    ring_page_order 0..RING_PAGE_ORDER_LIMIT, num_queues 1..MAX_QUEUES,
    max_indirect_segments 0 (no indirect requests) .. BLKIF_MAX_INDIRECT_SEGMENTS (4096:
    8 indirect pages of 512 segments).
    """

    ring_page_order: int = 0
    num_queues: int = 1
    max_indirect_segments: int = 0
    feature_persistent: bool = False
    feature_large_sector_size: bool = False

    def __post_init__(self) -> None:
        _check_uint(
            self.ring_page_order, "preferences.ring-page-order", maximum=RING_PAGE_ORDER_LIMIT
        )
        _check_uint(self.num_queues, "preferences.num-queues", minimum=1, maximum=MAX_QUEUES)
        _check_uint(
            self.max_indirect_segments,
            "preferences.max-indirect-segments",
            maximum=BLKIF_MAX_INDIRECT_SEGMENTS,
        )
        _check_bool(self.feature_persistent, "preferences.feature-persistent")
        _check_bool(self.feature_large_sector_size, "preferences.feature-large-sector-size")


@dataclass(frozen=True)
class Negotiated:
    """The parameters of one connection, as the frontend will use them."""

    ring_page_order: int
    num_queues: int
    max_indirect_segments: int
    persistent: bool
    large_sector_size: bool
    flush_cache: bool
    barrier: bool
    discard: bool
    discard_secure: bool
    discard_granularity: int | None
    discard_alignment: int

    @property
    def ring_pages(self) -> int:
        return 1 << self.ring_page_order

    def ring_info(self, queues: Sequence[QueueRing], protocol: str | None) -> FrontendRingInfo:
        """The FrontendRingInfo to write for rings granted with these parameters.

        Order 0 is written the Linux way (single `ring-ref`, no ring-page-order key).
        `queues` must hold exactly num_queues rings of ring_pages refs each.
        """
        if len(queues) != self.num_queues:
            raise FeatureError(
                "frontend.multi-queue-num-queues.count",
                f"{len(queues)} rings given, {self.num_queues} negotiated",
            )
        return FrontendRingInfo(
            queues=tuple(queues),
            ring_page_order=self.ring_page_order or None,
            protocol=protocol,
            feature_persistent=self.persistent,
            feature_large_sector_size=self.large_sector_size,
        )


def negotiate(backend: BackendFeatures, wanted: FrontendPreferences) -> Negotiated:
    """Combine the backend's offer with the frontend's wishes.

    - ring_page_order = min(wanted, backend max-ring-page-order); num_queues = min(wanted,
      backend multi-queue-max-queues). blkif.h lets the frontend pick anything up to the max.
    - max_indirect_segments = min(wanted, backend feature-max-indirect-segments), and 0 when
      that is at most BLKIF_MAX_SEGMENTS_PER_REQUEST (11): a direct request already carries
      that many, so indirect requests would only cost a page (Linux blkfront does the same).
    - persistent: only when both sides advertise feature-persistent. blkif.h lets either side
      use persistent grants alone, but then the backend's pool fills with grants the frontend
      never reuses; a frontend following this result reuses grants only when it pays.
    - large_sector_size: the frontend's own choice (the backend only reads it).
    - flush_cache, barrier, discard, discard_secure: as the backend advertises (requests may
      still fail with EOPNOTSUPP, blkif.h). discard_secure needs discard. discard_granularity
      None means "sector-size"; discard_alignment defaults to 0 (blkif.h note 4).
    Call it at InitWait for the transport parameters and again at Connected, when a backend
    like Linux blkback has published its I/O features (see the module docstring).
    """
    if not isinstance(backend, BackendFeatures) or not isinstance(wanted, FrontendPreferences):
        raise TypeError("negotiate(BackendFeatures, FrontendPreferences)")
    indirect = min(wanted.max_indirect_segments, backend.feature_max_indirect_segments)
    if indirect <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
        indirect = 0
    return Negotiated(
        ring_page_order=min(wanted.ring_page_order, backend.max_ring_page_order),
        num_queues=min(wanted.num_queues, backend.multi_queue_max_queues),
        max_indirect_segments=indirect,
        persistent=wanted.feature_persistent and backend.feature_persistent,
        large_sector_size=wanted.feature_large_sector_size,
        flush_cache=backend.feature_flush_cache,
        barrier=backend.feature_barrier,
        discard=backend.feature_discard,
        discard_secure=backend.feature_discard and backend.discard_secure,
        discard_granularity=backend.discard_granularity,
        discard_alignment=backend.discard_alignment or 0,
    )
