"""blkfront's named parts without a platform: the one teardown path (Teardown) and the
request builder (RequestBuilder): what a request carries and what the backend still offers.

The parts at work against a backend are covered by test_blkfront_device.py (a release that
fails is reported while the others run) and the suites that drive BlkFront.
"""

from __future__ import annotations

import pytest

from xentools.core.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE_BARRIER,
    X86_64,
    codec_for,
    decode_request,
    indirect_pages_for,
)
from xentools.core.features import Negotiated
from xentools.devices.blkfront_queue import InFlight
from xentools.devices.blkfront_requests import RequestBuilder
from xentools.devices.blkfront_teardown import Teardown


# -- Teardown ----------------------------------------------------------------------------------


def test_teardown_releases_in_reverse_order_once():
    teardown = Teardown()
    order: list[str] = []
    for name in ("xenstore", "rings", "grants"):
        teardown.on_close(name, lambda name=name: order.append(name))
    assert teardown.close() == []
    assert order == ["grants", "rings", "xenstore"]
    assert teardown.close() == [] and order == ["grants", "rings", "xenstore"]  # idempotent
    assert teardown.closed


def test_teardown_attempts_every_release_and_reports_each_failure():
    teardown = Teardown()
    order: list[str] = []

    def fails(name):
        def release():
            order.append(name)
            raise OSError(f"{name} refused")
        return release

    teardown.on_close("first", lambda: order.append("first"))
    teardown.on_close("second", fails("second"))
    teardown.on_close("third", fails("third"))
    errors = teardown.close()
    assert order == ["third", "second", "first"]
    assert errors == ["third: third refused", "second: second refused"]


def test_teardown_lets_an_interrupt_through_after_the_rest_ran():
    teardown = Teardown()
    order: list[str] = []
    teardown.on_close("first", lambda: order.append("first"))

    def interrupted():
        raise KeyboardInterrupt

    teardown.on_close("second", interrupted)
    with pytest.raises(KeyboardInterrupt):
        teardown.close()
    assert order == ["first"]
    assert teardown.close() == [] and order == ["first"]


def test_teardown_refuses_a_resource_acquired_after_it_ran():
    teardown = Teardown()
    teardown.close()
    with pytest.raises(RuntimeError, match="late"):
        teardown.on_close("late", lambda: None)


# -- RequestBuilder ---------------------------------------------------------------------------


def _features(**overrides) -> Negotiated:
    values = dict(
        ring_page_order=0, num_queues=1, max_indirect_segments=256, persistent=True,
        large_sector_size=False, flush_cache=True, barrier=False, discard=True,
        discard_secure=True, discard_granularity=None, discard_alignment=0,
    )
    values.update(overrides)
    return Negotiated(**values)


def _builder(max_indirect_segments=256, data_pages=1000, sector_size=512, **features) -> RequestBuilder:
    return RequestBuilder(
        handle=51712, sector_size=sector_size, max_indirect_segments=max_indirect_segments,
        data_pages=data_pages, features=_features(**features), stats={"direct_requests": 0, "indirect_requests": 0},
    )


@pytest.mark.parametrize(
    "max_indirect,data_pages,segments,indirect",
    [
        (0, 1000, BLKIF_MAX_SEGMENTS_PER_REQUEST, False),  # indirect off: direct requests
        (256, 1000, 256, True),
        (256, 63, 31 - indirect_pages_for(31), True),  # half the pool, minus indirect pages
        (256, 20, BLKIF_MAX_SEGMENTS_PER_REQUEST, False),  # too small for more than direct
        (8, 1000, BLKIF_MAX_SEGMENTS_PER_REQUEST, False),  # at most 11: no indirect requests
    ],
)
def test_segments_per_request_stay_within_half_the_pool(max_indirect, data_pages, segments, indirect):
    builder = _builder(max_indirect, data_pages)
    assert (builder.segments_per_request, builder.indirect) == (segments, indirect)
    assert builder.chunk_bytes == segments * 4096
    assert builder.max_request_pages == segments + (indirect_pages_for(segments) if indirect else 0)


def test_pages_and_last_sector_of_a_request():
    builder = _builder(sector_size=512)
    assert builder.pages_for(512) == 1
    assert builder.pages_for(11 * 4096) == 11  # direct: no indirect page
    assert builder.pages_for(12 * 4096) == 12 + indirect_pages_for(12)
    assert builder.last_sect(4096) == 7 and builder.last_sect(4096 + 1024) == 1
    assert _builder(sector_size=4096).last_sect(8192) == 0


def test_flush_is_the_cache_flush_else_the_barrier_and_eopnotsupp_turns_it_off():
    assert _builder().flush_op == BLKIF_OP_FLUSH_DISKCACHE
    assert _builder(flush_cache=False, barrier=True).flush_op == BLKIF_OP_WRITE_BARRIER
    builder = _builder(flush_cache=False, barrier=False)
    assert builder.flush_op is None
    builder = _builder()
    assert builder.not_supported(BLKIF_OP_FLUSH_DISKCACHE) and builder.flush_op is None
    assert builder.not_supported(BLKIF_OP_DISCARD) and not builder.discard and not builder.discard_secure
    assert not builder.not_supported(BLKIF_OP_READ)


def test_bare_requests_carry_the_handle_and_no_segment():
    builder = _builder()
    codec = codec_for(X86_64)
    entry = InFlight()
    entry.id, entry.op, entry.sector, entry.nr_sectors, entry.secure = 7, BLKIF_OP_DISCARD, 64, 16, True
    discard = decode_request(bytes(builder.bare(codec, entry)), X86_64)
    assert (discard.id, discard.sector_number, discard.nr_sectors, discard.secure) == (7, 64, 16, True)
    entry.op = BLKIF_OP_FLUSH_DISKCACHE
    flush = decode_request(bytes(builder.bare(codec, entry)), X86_64)
    assert (flush.operation, flush.handle, flush.segments) == (BLKIF_OP_FLUSH_DISKCACHE, 51712 & 0xFFFF, ())
