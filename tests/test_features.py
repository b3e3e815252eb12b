"""Tests of xentools.core.features: each xenstore record round-trips, every missing or
malformed key raises FeatureError with the rule naming it, values arrive as str or bytes,
and negotiate() cuts the frontend's wishes down to the backend's offer."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.core.errors import FeatureError
from xentools.core.features import (
    DOMID_FIRST_RESERVED,
    MAX_QUEUES,
    PROTOCOLS,
    RING_PAGE_ORDER_LIMIT,
    U32_MAX,
    U64_MAX,
    BackendFeatures,
    BackendToolstackKeys,
    DiskInfo,
    FrontendPreferences,
    FrontendRingInfo,
    FrontendToolstackKeys,
    QueueRing,
    negotiate,
    parse_bool,
    parse_uint,
)

FAST = settings(max_examples=60, deadline=None)


def _raises(rule: str):
    return pytest.raises(FeatureError, match=f"^{re.escape(rule)}: ")


def _as_bytes(keys: dict[str, str]) -> dict[str, bytes]:
    return {key: value.encode() for key, value in keys.items()}


# Values that are not strict decimal numbers.
NOT_DECIMAL = [
    "",
    " 1",
    "1 ",
    "1\n",
    "-1",
    "+1",
    "0x10",
    "12x",
    "1.0",
    "1e3",
    "\uff11",
    "\u0661",
    "1\x00",
    b"\xff",
    b"1\xff",
]
NOT_BOOLEAN = ["", "2", "01", "true", "yes", " 1", "1\n", "-0", b"\x01", b"\xff"]


# --- parse_uint / parse_bool ------------------------------------------------------------------


@pytest.mark.parametrize("raw", NOT_DECIMAL)
def test_parse_uint_malformed(raw: str | bytes) -> None:
    with _raises("backend.sectors.malformed"):
        parse_uint(raw, "backend.sectors", maximum=U64_MAX)


@pytest.mark.parametrize(
    ("raw", "value"),
    [("0", 0), ("7", 7), ("007", 7), (b"4294967295", U32_MAX), ("0" * 4000 + "5", 5)],
)
def test_parse_uint_accepts(raw: str | bytes, value: int) -> None:
    assert parse_uint(raw, "x.y") == value


@pytest.mark.parametrize("raw", ["4294967296", "9" * 5000, b"18446744073709551616"])
def test_parse_uint_range(raw: str | bytes) -> None:
    with _raises("x.y.range"):
        parse_uint(raw, "x.y")


def test_parse_uint_minimum_and_non_string() -> None:
    with _raises("x.n.range"):
        parse_uint("0", "x.n", minimum=1)
    with _raises("x.n.malformed"):
        parse_uint(5, "x.n")  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", NOT_BOOLEAN)
def test_parse_bool_malformed(raw: str | bytes) -> None:
    with _raises("backend.feature-barrier.malformed"):
        parse_bool(raw, "backend.feature-barrier")


def test_parse_bool() -> None:
    assert parse_bool("1", "a.b") is True and parse_bool(b"0", "a.b") is False


# --- BackendFeatures ----------------------------------------------------------------------------

u32 = st.integers(0, U32_MAX)
backend_features = st.builds(
    BackendFeatures,
    feature_flush_cache=st.booleans(),
    feature_barrier=st.booleans(),
    feature_discard=st.booleans(),
    discard_granularity=st.none() | u32,
    discard_alignment=st.none() | u32,
    discard_secure=st.booleans(),
    feature_persistent=st.booleans(),
    feature_max_indirect_segments=u32,
    max_ring_page_order=u32,
    multi_queue_max_queues=st.integers(1, U32_MAX),
)


@FAST
@given(backend_features, st.booleans())
def test_backend_features_round_trip(record: BackendFeatures, as_bytes: bool) -> None:
    keys = record.to_keys()
    assert all(isinstance(value, str) for value in keys.values())
    assert BackendFeatures.from_keys(_as_bytes(keys) if as_bytes else keys) == record


def test_backend_features_defaults_and_linux_keys() -> None:
    assert BackendFeatures.from_keys({}) == BackendFeatures()
    # What Linux blkback writes at probe time, plus one unrelated key.
    record = BackendFeatures.from_keys(
        {
            "feature-max-indirect-segments": "256",
            "multi-queue-max-queues": "4",
            "max-ring-page-order": "4",
            "params": "x",
        }
    )
    assert (
        record.feature_max_indirect_segments,
        record.multi_queue_max_queues,
        record.max_ring_page_order,
    ) == (256, 4, 4)
    assert not record.feature_flush_cache and not record.feature_persistent


def test_backend_features_to_keys_exact() -> None:
    keys = BackendFeatures(
        feature_flush_cache=True,
        feature_discard=True,
        discard_granularity=4096,
        discard_alignment=0,
    ).to_keys()
    assert keys == {
        "feature-flush-cache": "1",
        "feature-barrier": "0",
        "feature-discard": "1",
        "discard-granularity": "4096",
        "discard-alignment": "0",
        "discard-secure": "0",
        "feature-persistent": "0",
        "max-ring-page-order": "0",
        "multi-queue-max-queues": "1",
    }
    # blkif.h: a backend that does not do BLKIF_OP_INDIRECT must not create the node.
    assert "feature-max-indirect-segments" not in keys


BACKEND_BOOL_KEYS = [
    "feature-flush-cache",
    "feature-barrier",
    "feature-discard",
    "discard-secure",
    "feature-persistent",
]
BACKEND_U32_KEYS = [
    "discard-granularity",
    "discard-alignment",
    "feature-max-indirect-segments",
    "max-ring-page-order",
    "multi-queue-max-queues",
]


@pytest.mark.parametrize("key", BACKEND_BOOL_KEYS)
@pytest.mark.parametrize("raw", NOT_BOOLEAN)
def test_backend_features_bad_boolean(key: str, raw: str | bytes) -> None:
    with _raises(f"backend.{key}.malformed"):
        BackendFeatures.from_keys({key: raw})


@pytest.mark.parametrize("key", BACKEND_U32_KEYS)
def test_backend_features_bad_numbers(key: str) -> None:
    for raw in NOT_DECIMAL:
        with _raises(f"backend.{key}.malformed"):
            BackendFeatures.from_keys({key: raw})
    with _raises(f"backend.{key}.range"):
        BackendFeatures.from_keys({key: str(U32_MAX + 1)})


def test_backend_features_zero_queues() -> None:
    with _raises("backend.multi-queue-max-queues.range"):
        BackendFeatures.from_keys({"multi-queue-max-queues": "0"})
    with _raises("backend.multi-queue-max-queues.range"):
        BackendFeatures(multi_queue_max_queues=0)


def test_backend_features_construction_checks_types() -> None:
    with _raises("backend.feature-flush-cache.malformed"):
        BackendFeatures(feature_flush_cache=1)  # type: ignore[arg-type]
    with _raises("backend.max-ring-page-order.malformed"):
        BackendFeatures(max_ring_page_order=True)
    with _raises("backend.discard-granularity.range"):
        BackendFeatures(discard_granularity=-1)


def test_values_of_other_types_are_malformed() -> None:
    with _raises("backend.feature-barrier.malformed"):
        BackendFeatures.from_keys({"feature-barrier": 1})  # type: ignore[dict-item]
    with _raises("backend.keys.malformed"):
        BackendFeatures.from_keys([("feature-barrier", "1")])  # type: ignore[arg-type]


# --- DiskInfo -----------------------------------------------------------------------------------

disk_infos = st.builds(
    lambda sectors, info, shift, mult: DiskInfo(
        sectors, info, 512 << shift, None if mult is None else (512 << shift) * mult
    ),
    st.integers(0, U64_MAX),
    u32,
    st.integers(0, 12),
    st.none() | st.integers(1, 8),
)


@FAST
@given(disk_infos, st.booleans())
def test_disk_info_round_trip(record: DiskInfo, as_bytes: bool) -> None:
    keys = record.to_keys()
    assert {"sectors", "info", "sector-size"} <= keys.keys()
    assert DiskInfo.from_keys(_as_bytes(keys) if as_bytes else keys) == record


def test_disk_info_missing_and_defaults() -> None:
    with _raises("backend.sectors.missing"):
        DiskInfo.from_keys({"info": "0", "sector-size": "512"})
    record = DiskInfo.from_keys({"sectors": b"2048"})
    assert (record.info, record.sector_size, record.physical_sector_size) == (0, 512, None)
    assert record.size_bytes == 2048 * 512


@pytest.mark.parametrize("key", ["sectors", "info", "sector-size", "physical-sector-size"])
@pytest.mark.parametrize("raw", NOT_DECIMAL)
def test_disk_info_malformed(key: str, raw: str | bytes) -> None:
    keys: dict[str, str | bytes] = {"sectors": "100"}
    keys[key] = raw
    with _raises(f"backend.{key}.malformed"):
        DiskInfo.from_keys(keys)


def test_disk_info_ranges() -> None:
    assert DiskInfo.from_keys({"sectors": str(U64_MAX)}).sectors == U64_MAX
    with _raises("backend.sectors.range"):
        DiskInfo.from_keys({"sectors": str(U64_MAX + 1)})
    with _raises("backend.info.range"):
        DiskInfo.from_keys({"sectors": "1", "info": str(U32_MAX + 1)})
    for bad in ("0", "256", "1000", "1536", "511"):
        with _raises("backend.sector-size.range"):
            DiskInfo.from_keys({"sectors": "1", "sector-size": bad})
    for bad in ("0", "768", "1000"):
        with _raises("backend.physical-sector-size.range"):
            DiskInfo.from_keys({"sectors": "1", "sector-size": "512", "physical-sector-size": bad})
    with _raises("backend.physical-sector-size.range"):
        DiskInfo(1, sector_size=4096, physical_sector_size=512)
    with _raises("backend.sectors.range"):
        DiskInfo(10**5000)


def test_disk_info_bits_and_large_sectors() -> None:
    record = DiskInfo(100, info=1 | 2 | 4, sector_size=4096)
    assert record.cdrom and record.removable and record.readonly
    assert not DiskInfo(100, info=4 << 1).readonly
    with _raises("backend.sector-size.large"):
        record.validate(feature_large_sector_size=False)
    record.validate(feature_large_sector_size=True)
    DiskInfo(100).validate(feature_large_sector_size=False)


# --- FrontendRingInfo ---------------------------------------------------------------------------


@st.composite
def ring_infos(draw) -> FrontendRingInfo:
    order = draw(st.none() | st.integers(0, RING_PAGE_ORDER_LIMIT))
    pages = 1 << (order or 0)
    count = draw(st.integers(1, 5))
    queues = [
        QueueRing(tuple(draw(st.lists(u32, min_size=pages, max_size=pages))), draw(u32))
        for _ in range(count)
    ]
    return FrontendRingInfo(
        tuple(queues),
        order,
        draw(st.none() | st.sampled_from(sorted(PROTOCOLS))),
        draw(st.booleans()),
        draw(st.booleans()),
    )


@FAST
@given(ring_infos(), st.booleans())
def test_ring_info_round_trip(record: FrontendRingInfo, as_bytes: bool) -> None:
    keys = record.to_keys()
    assert FrontendRingInfo.from_keys(_as_bytes(keys) if as_bytes else keys) == record
    # Multi-queue rings never leave top-level ring keys behind, and one queue never writes
    # queue-N directories.
    if record.num_queues > 1:
        assert not any(key.startswith(("ring-ref", "event-channel")) for key in keys)
        assert keys["multi-queue-num-queues"] == str(record.num_queues)
    else:
        assert not any(key.startswith("queue-") for key in keys)
        assert "multi-queue-num-queues" not in keys


def test_ring_info_blkif_h_example() -> None:
    # blkif.h, "Multiple hardware queues/rings": two queues of two pages each.
    record = FrontendRingInfo((QueueRing((10, 11), 20), QueueRing((12, 13), 21)), ring_page_order=1)
    keys = record.to_keys()
    assert keys == {
        "multi-queue-num-queues": "2",
        "ring-page-order": "1",
        "queue-0/ring-ref0": "10",
        "queue-0/ring-ref1": "11",
        "queue-0/event-channel": "20",
        "queue-1/ring-ref0": "12",
        "queue-1/ring-ref1": "13",
        "queue-1/event-channel": "21",
        "feature-persistent": "0",
        "feature-large-sector-size": "0",
    }
    # The directory nodes xenstore shows ("queue-0" = "") are accepted and ignored.
    assert FrontendRingInfo.from_keys({**keys, "queue-0": "", "queue-1": b""}) == record


def test_ring_info_single_page_linux_style() -> None:
    keys = {
        "ring-ref": "8",
        "event-channel": "15",
        "protocol": "x86_64-abi",
        "feature-persistent": "1",
    }
    record = FrontendRingInfo.from_keys(keys)
    assert record.ring_page_order is None and record.ring_pages == 1
    assert record.queues == (QueueRing((8,), 15),)
    assert (
        record.protocol == "x86_64-abi"
        and record.feature_persistent
        and not record.feature_large_sector_size
    )
    # One queue announced explicitly still uses the top-level keys (blkif.h).
    assert FrontendRingInfo.from_keys({**keys, "multi-queue-num-queues": "1"}) == record
    # Order 0 written with ring-page-order takes ring-ref0 (Linux blkback reads it so).
    zero = FrontendRingInfo.from_keys(
        {"ring-page-order": "0", "ring-ref0": "8", "event-channel": "15"}
    )
    assert zero.ring_page_order == 0 and zero.queues == (QueueRing((8,), 15),)
    assert zero.to_keys()["ring-ref0"] == "8" and "ring-ref" not in zero.to_keys()


@pytest.mark.parametrize(
    ("keys", "rule"),
    [
        ({"event-channel": "1"}, "frontend.ring-ref.missing"),
        ({"ring-ref": "1"}, "frontend.event-channel.missing"),
        (
            {"ring-page-order": "0", "ring-ref": "1", "event-channel": "1"},
            "frontend.ring-ref.missing",
        ),
        (
            {
                "ring-page-order": "2",
                "ring-ref0": "1",
                "ring-ref1": "2",
                "ring-ref3": "4",
                "event-channel": "1",
            },
            "frontend.ring-ref.missing",
        ),
        (
            {"multi-queue-num-queues": "2", "ring-ref": "1", "event-channel": "1"},
            "frontend.ring-ref.missing",
        ),
        (
            {
                "multi-queue-num-queues": "2",
                "queue-0/ring-ref": "1",
                "queue-0/event-channel": "2",
                "queue-1/ring-ref": "3",
            },
            "frontend.event-channel.missing",
        ),
        ({"ring-ref": "12x", "event-channel": "1"}, "frontend.ring-ref.malformed"),
        ({"ring-ref": "1", "event-channel": ""}, "frontend.event-channel.malformed"),
        ({"ring-ref": "4294967296", "event-channel": "1"}, "frontend.ring-ref.range"),
        ({"ring-ref": "1", "event-channel": "4294967296"}, "frontend.event-channel.range"),
        ({"ring-page-order": "5", "event-channel": "1"}, "frontend.ring-page-order.range"),
        ({"ring-page-order": "4294967295", "event-channel": "1"}, "frontend.ring-page-order.range"),
        ({"ring-page-order": "one", "event-channel": "1"}, "frontend.ring-page-order.malformed"),
        (
            {"multi-queue-num-queues": "0", "ring-ref": "1", "event-channel": "1"},
            "frontend.multi-queue-num-queues.range",
        ),
        ({"multi-queue-num-queues": str(MAX_QUEUES + 1)}, "frontend.multi-queue-num-queues.range"),
        ({"multi-queue-num-queues": "2 "}, "frontend.multi-queue-num-queues.malformed"),
        (
            {"ring-ref": "1", "event-channel": "1", "protocol": "x86_16-abi"},
            "frontend.protocol.unknown",
        ),
        (
            {"ring-ref": "1", "event-channel": "1", "protocol": b"\xff"},
            "frontend.protocol.malformed",
        ),
        (
            {"ring-ref": "1", "event-channel": "1", "feature-persistent": "2"},
            "frontend.feature-persistent.malformed",
        ),
        (
            {"ring-ref": "1", "event-channel": "1", "feature-large-sector-size": "yes"},
            "frontend.feature-large-sector-size.malformed",
        ),
    ],
)
def test_ring_info_bad_keys(keys: dict[str, str | bytes], rule: str) -> None:
    with _raises(rule):
        FrontendRingInfo.from_keys(keys)


def test_ring_info_missing_key_is_named_in_the_message() -> None:
    keys = {
        "ring-page-order": "1",
        "multi-queue-num-queues": "2",
        "queue-0/ring-ref0": "1",
        "queue-0/ring-ref1": "2",
    }
    keys |= {"queue-0/event-channel": "3", "queue-1/ring-ref0": "4", "queue-1/event-channel": "5"}
    with pytest.raises(FeatureError, match="queue-1/ring-ref1") as info:
        FrontendRingInfo.from_keys(keys)
    assert info.value.rule == "frontend.ring-ref.missing"


def test_ring_info_validate_against_backend() -> None:
    record = FrontendRingInfo((QueueRing((1, 2, 3, 4), 9),) * 3, ring_page_order=2)
    record.validate(max_ring_page_order=2, max_queues=3)
    with _raises("frontend.ring-page-order.range"):
        record.validate(max_ring_page_order=1, max_queues=3)
    with _raises("frontend.multi-queue-num-queues.range"):
        record.validate(max_ring_page_order=4, max_queues=2)
    single = FrontendRingInfo((QueueRing((1,), 9),))
    single.validate(max_ring_page_order=0, max_queues=1)


def test_ring_info_construction_checks() -> None:
    with _raises("frontend.ring-ref.count"):
        QueueRing((), 1)
    with _raises("frontend.ring-ref.count"):
        QueueRing((1, 2, 3), 1)
    with _raises("frontend.ring-ref.range"):
        QueueRing((-1,), 1)
    with _raises("frontend.event-channel.range"):
        QueueRing((1,), U32_MAX + 1)
    assert QueueRing([1, 2], 3).ring_refs == (1, 2)  # lists are kept as tuples
    with _raises("frontend.ring-ref.count"):
        FrontendRingInfo((QueueRing((1, 2), 3),))  # two pages need ring-page-order 1
    with _raises("frontend.multi-queue-num-queues.range"):
        FrontendRingInfo(())
    with _raises("frontend.protocol.unknown"):
        FrontendRingInfo((QueueRing((1,), 3),), protocol="native")
    with _raises("frontend.ring-page-order.range"):
        FrontendRingInfo((QueueRing((1,), 3),), ring_page_order=RING_PAGE_ORDER_LIMIT + 1)


# --- toolstack records --------------------------------------------------------------------------

paths = st.lists(st.text("abcxyz0189-_@", min_size=1, max_size=8), min_size=1, max_size=6).map(
    lambda parts: "/" + "/".join(parts)
)
words = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=10)
domids = st.integers(0, DOMID_FIRST_RESERVED - 1)

backend_toolstack = st.builds(
    BackendToolstackKeys,
    params=st.text(
        st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30
    ),
    type=words,
    mode=st.sampled_from(["r", "w"]),
    frontend=paths,
    frontend_id=domids,
    physical_device=st.none() | st.tuples(u32, u32),
    physical_device_path=st.none()
    | st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30),
    online=st.booleans(),
    discard_enable=st.booleans(),
)
frontend_toolstack = st.builds(
    FrontendToolstackKeys,
    backend=paths,
    backend_id=domids,
    virtual_device=u32,
    device_type=words,
    trusted=st.booleans(),
)


@FAST
@given(backend_toolstack, st.booleans())
def test_backend_toolstack_round_trip(record: BackendToolstackKeys, as_bytes: bool) -> None:
    keys = record.to_keys()
    assert BackendToolstackKeys.from_keys(_as_bytes(keys) if as_bytes else keys) == record


@FAST
@given(frontend_toolstack, st.booleans())
def test_frontend_toolstack_round_trip(record: FrontendToolstackKeys, as_bytes: bool) -> None:
    keys = record.to_keys()
    assert FrontendToolstackKeys.from_keys(_as_bytes(keys) if as_bytes else keys) == record


BACKEND_TOOLSTACK = {
    "params": "/srv/disk.img",
    "type": "file",
    "mode": "w",
    "frontend": "/local/domain/3/device/vbd/51712",
    "frontend-id": "3",
}


def test_backend_toolstack_defaults_and_hex_device() -> None:
    record = BackendToolstackKeys.from_keys({**BACKEND_TOOLSTACK, "physical-device": "fd:1a"})
    assert record.physical_device == (0xFD, 0x1A)
    assert record.online is False and record.discard_enable is True and not record.readonly
    assert record.to_keys()["physical-device"] == "fd:1a"


@pytest.mark.parametrize("key", sorted(BACKEND_TOOLSTACK))
def test_backend_toolstack_missing(key: str) -> None:
    keys = dict(BACKEND_TOOLSTACK)
    del keys[key]
    with _raises(f"backend.{key}.missing"):
        BackendToolstackKeys.from_keys(keys)


@pytest.mark.parametrize(
    ("key", "raw", "rule"),
    [
        ("mode", "rw", "backend.mode.unknown"),
        ("mode", "", "backend.mode.unknown"),
        ("frontend", "local/domain/3", "backend.frontend.malformed"),
        ("frontend", "/local//domain", "backend.frontend.malformed"),
        ("frontend", "/local/domain/", "backend.frontend.malformed"),
        ("frontend", "/local/dom ain", "backend.frontend.malformed"),
        ("frontend-id", str(DOMID_FIRST_RESERVED), "backend.frontend-id.range"),
        ("frontend-id", "3x", "backend.frontend-id.malformed"),
        ("type", "", "backend.type.malformed"),
        ("type", "ph y", "backend.type.malformed"),
        ("params", b"\xff\xfe", "backend.params.malformed"),
        ("params", "a\0b", "backend.params.malformed"),
        ("physical-device", "fd", "backend.physical-device.malformed"),
        ("physical-device", "fd:", "backend.physical-device.malformed"),
        ("physical-device", "xy:1", "backend.physical-device.malformed"),
        ("physical-device", "1:2:3", "backend.physical-device.malformed"),
        ("physical-device", "123456789:1", "backend.physical-device.malformed"),
        ("online", "2", "backend.online.malformed"),
        ("discard-enable", "true", "backend.discard-enable.malformed"),
    ],
)
def test_backend_toolstack_malformed(key: str, raw: str | bytes, rule: str) -> None:
    with _raises(rule):
        BackendToolstackKeys.from_keys({**BACKEND_TOOLSTACK, key: raw})


def test_backend_toolstack_utf8_params() -> None:
    record = BackendToolstackKeys.from_keys(
        {**BACKEND_TOOLSTACK, "params": "/srv/d\u00e9j\u00e0.img".encode()}
    )
    assert record.params == "/srv/d\u00e9j\u00e0.img"


FRONTEND_TOOLSTACK = {
    "backend": "/local/domain/0/backend/vbd/3/51712",
    "backend-id": "0",
    "virtual-device": "51712",
}


def test_frontend_toolstack_defaults() -> None:
    record = FrontendToolstackKeys.from_keys(FRONTEND_TOOLSTACK)
    assert (record.backend_id, record.virtual_device, record.device_type, record.trusted) == (
        0,
        51712,
        "disk",
        True,
    )
    assert (
        FrontendToolstackKeys.from_keys(
            {**FRONTEND_TOOLSTACK, "trusted": b"0", "device-type": "cdrom"}
        ).trusted
        is False
    )


@pytest.mark.parametrize("key", sorted(FRONTEND_TOOLSTACK))
def test_frontend_toolstack_missing(key: str) -> None:
    keys = dict(FRONTEND_TOOLSTACK)
    del keys[key]
    with _raises(f"frontend.{key}.missing"):
        FrontendToolstackKeys.from_keys(keys)


@pytest.mark.parametrize(
    ("key", "raw", "rule"),
    [
        ("backend", "backend/vbd", "frontend.backend.malformed"),
        ("backend-id", "-1", "frontend.backend-id.malformed"),
        ("backend-id", "65535", "frontend.backend-id.range"),
        ("virtual-device", "xvda", "frontend.virtual-device.malformed"),
        ("virtual-device", "51712\n", "frontend.virtual-device.malformed"),
        ("device-type", "", "frontend.device-type.malformed"),
        ("device-type", b"d\xc3\xa9", "frontend.device-type.malformed"),
        ("trusted", "", "frontend.trusted.malformed"),
    ],
)
def test_frontend_toolstack_malformed(key: str, raw: str | bytes, rule: str) -> None:
    with _raises(rule):
        FrontendToolstackKeys.from_keys({**FRONTEND_TOOLSTACK, key: raw})


# --- every parser fails only with FeatureError --------------------------------------------------

hostile_values = st.one_of(
    st.sampled_from(["0", "1", "4", "512", "x86_64-abi", "w", "/a/b", "fd:0", ""]),
    st.text(max_size=12),
    st.binary(max_size=12),
)
hostile_keys = st.sampled_from(
    sorted(
        set(BackendFeatures().to_keys())
        | set(DiskInfo(1).to_keys())
        | {
            "physical-sector-size",
            "ring-ref",
            "ring-ref0",
            "ring-ref1",
            "event-channel",
            "ring-page-order",
        }
        | {
            "multi-queue-num-queues",
            "queue-0/ring-ref",
            "queue-0/event-channel",
            "queue-1/ring-ref",
            "protocol",
        }
        | set(BACKEND_TOOLSTACK)
        | set(FRONTEND_TOOLSTACK)
        | {"online", "physical-device", "trusted", "device-type"}
    )
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(hostile_keys, hostile_values, max_size=12))
def test_parsers_raise_only_feature_error(keys: dict[str, str | bytes]) -> None:
    for record in (
        BackendFeatures,
        DiskInfo,
        FrontendRingInfo,
        BackendToolstackKeys,
        FrontendToolstackKeys,
    ):
        try:
            parsed = record.from_keys(keys)
        except FeatureError as err:
            assert re.fullmatch(
                r"(backend|frontend)\.[a-z0-9/-]+\.(missing|malformed|range|unknown|count)",
                err.rule,
            ), err.rule
            assert str(err).startswith(err.rule + ": ") and "\n" not in str(err)
        else:
            assert record.from_keys(parsed.to_keys()) == parsed


# --- negotiation --------------------------------------------------------------------------------

preferences = st.builds(
    FrontendPreferences,
    ring_page_order=st.integers(0, RING_PAGE_ORDER_LIMIT),
    num_queues=st.integers(1, MAX_QUEUES),
    max_indirect_segments=st.integers(0, 4096),
    feature_persistent=st.booleans(),
    feature_large_sector_size=st.booleans(),
)


@FAST
@given(backend_features, preferences)
def test_negotiate_properties(backend: BackendFeatures, wanted: FrontendPreferences) -> None:
    result = negotiate(backend, wanted)
    assert result.ring_page_order == min(wanted.ring_page_order, backend.max_ring_page_order)
    assert result.num_queues == min(wanted.num_queues, backend.multi_queue_max_queues) >= 1
    limit = min(wanted.max_indirect_segments, backend.feature_max_indirect_segments)
    assert result.max_indirect_segments == (limit if limit > 11 else 0)
    assert result.persistent == (wanted.feature_persistent and backend.feature_persistent)
    assert result.large_sector_size == wanted.feature_large_sector_size
    assert (result.flush_cache, result.barrier, result.discard) == (
        backend.feature_flush_cache,
        backend.feature_barrier,
        backend.feature_discard,
    )
    assert result.discard_secure <= result.discard
    # What the frontend then writes is acceptable to the backend that made the offer.
    rings = [QueueRing(tuple(range(result.ring_pages)), 7)] * result.num_queues
    info = result.ring_info(rings, "x86_64-abi")
    info.validate(
        max_ring_page_order=backend.max_ring_page_order, max_queues=backend.multi_queue_max_queues
    )
    assert FrontendRingInfo.from_keys(info.to_keys()) == info


def test_negotiate_examples() -> None:
    linux_blkback = BackendFeatures(
        feature_flush_cache=True,
        feature_barrier=True,
        feature_persistent=True,
        feature_max_indirect_segments=256,
        max_ring_page_order=4,
        multi_queue_max_queues=8,
    )
    result = negotiate(
        linux_blkback,
        FrontendPreferences(ring_page_order=2, num_queues=4, max_indirect_segments=32),
    )
    assert (
        result.ring_page_order,
        result.ring_pages,
        result.num_queues,
        result.max_indirect_segments,
    ) == (2, 4, 4, 32)
    assert result.flush_cache and result.barrier and not result.discard and not result.persistent
    old = negotiate(
        BackendFeatures(),
        FrontendPreferences(
            ring_page_order=4, num_queues=4, max_indirect_segments=4096, feature_persistent=True
        ),
    )
    assert (old.ring_page_order, old.num_queues, old.max_indirect_segments, old.persistent) == (
        0,
        1,
        0,
        False,
    )
    # Eleven segments fit a direct request: indirect is not worth a page.
    assert (
        negotiate(
            replace(linux_blkback, feature_max_indirect_segments=11),
            FrontendPreferences(max_indirect_segments=64),
        ).max_indirect_segments
        == 0
    )
    discard = negotiate(
        BackendFeatures(feature_discard=True, discard_secure=True, discard_granularity=4096),
        FrontendPreferences(),
    )
    assert (
        discard.discard
        and discard.discard_secure
        and discard.discard_granularity == 4096
        and discard.discard_alignment == 0
    )
    assert not negotiate(BackendFeatures(discard_secure=True), FrontendPreferences()).discard_secure


def test_negotiated_ring_info_linux_layout() -> None:
    single = negotiate(BackendFeatures(), FrontendPreferences()).ring_info(
        [QueueRing((5,), 6)], None
    )
    assert single.to_keys() == {
        "ring-ref": "5",
        "event-channel": "6",
        "feature-persistent": "0",
        "feature-large-sector-size": "0",
    }
    result = negotiate(
        BackendFeatures(max_ring_page_order=1, multi_queue_max_queues=2),
        FrontendPreferences(ring_page_order=1, num_queues=2),
    )
    with _raises("frontend.multi-queue-num-queues.count"):
        result.ring_info([QueueRing((1, 2), 3)], None)
    with _raises("frontend.ring-ref.count"):
        result.ring_info([QueueRing((1,), 3), QueueRing((2,), 4)], None)


def test_preferences_bounds() -> None:
    with _raises("preferences.ring-page-order.range"):
        FrontendPreferences(ring_page_order=RING_PAGE_ORDER_LIMIT + 1)
    with _raises("preferences.num-queues.range"):
        FrontendPreferences(num_queues=0)
    with _raises("preferences.max-indirect-segments.range"):
        FrontendPreferences(max_indirect_segments=4097)
    with pytest.raises(TypeError):
        negotiate(FrontendPreferences(), BackendFeatures())  # type: ignore[arg-type]
