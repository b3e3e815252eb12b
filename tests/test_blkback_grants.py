"""blkback_grants.SegmentMapper: per-request maps and the bounded persistent-grant cache
(XSA-365/371: every map checked, nothing leaked), against an in-memory GrantMapper that
records every map and unmap."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.devices.blkback_grants import SegmentMapper
from xentools.platform.interface import PAGE_SIZE, GrantError, GrantMapper, MappedPages


class FakeMapped(MappedPages):
    def __init__(self, domid: int, refs: tuple[int, ...], writable: bool) -> None:
        self.domid, self.refs, self.writable = domid, refs, writable
        self._buf = bytearray(PAGE_SIZE * len(refs))
        for i, ref in enumerate(refs):  # each page starts with its ref, to check views
            self._buf[i * PAGE_SIZE : i * PAGE_SIZE + 4] = ref.to_bytes(4, "little")
        self.unmapped = False

    @property
    def buf(self) -> memoryview:
        assert not self.unmapped, "use after unmap"
        view = memoryview(self._buf)
        return view if self.writable else view.toreadonly()


class FakeGnttab(GrantMapper):
    """Grants 0..granted-1 of domain 1 exist; others fail like an ungranted ref."""

    def __init__(self, granted: int = 10_000) -> None:
        self.granted = granted
        self.live: list[FakeMapped] = []
        self.calls = 0

    def map(self, domid, refs, writable):  # type: ignore[no-untyped-def]
        self.calls += 1
        refs = tuple(refs)
        bad = [r for r in refs if not 0 <= r < self.granted or domid != 1]
        if bad:
            raise GrantError(f"grant.unknown_ref: domain {domid} has no grant ref {bad[0]}")
        mapped = FakeMapped(domid, refs, writable)
        self.live.append(mapped)
        return mapped

    def unmap(self, pages):  # type: ignore[no-untyped-def]
        assert pages in self.live, "unmap of something not mapped"
        self.live.remove(pages)
        pages.unmapped = True

    def close(self) -> None:
        pass

    def mapped_refs(self) -> int:
        return sum(len(m.refs) for m in self.live)


def ref_in(view: memoryview) -> int:
    return int.from_bytes(view[:4], "little")


def test_non_persistent_maps_once_per_request_and_unmaps_on_release() -> None:
    gnttab = FakeGnttab()
    mapper = SegmentMapper(gnttab, 1, persistent=False)
    pages = mapper.map([5, 6, 5], writable=False)
    assert pages.contiguous is not None and len(pages.contiguous) == 3 * PAGE_SIZE
    assert pages.contiguous.readonly and gnttab.calls == 1
    assert [ref_in(pages.contiguous[i * PAGE_SIZE :]) for i in range(3)] == [5, 6, 5]
    mapper.release(pages)
    assert gnttab.live == [] and mapper.cached == 0


def test_failed_map_leaves_nothing_mapped() -> None:
    gnttab = FakeGnttab(granted=100)
    for persistent in (False, True):
        mapper = SegmentMapper(gnttab, 1, persistent=persistent)
        with pytest.raises(GrantError):
            mapper.map([1, 2, 500], writable=True)
        assert gnttab.live == [] and mapper.cached == 0
        mapper.close()


def test_persistent_cache_reuses_maps_writable() -> None:
    gnttab = FakeGnttab()
    mapper = SegmentMapper(gnttab, 1, persistent=True, max_persistent=8)
    first = mapper.map([1, 2, 3], writable=False)
    assert first.temporary == [] and gnttab.calls == 1
    assert all(not v.readonly for v in first.views)  # blkif.h note 8: always writable
    mapper.release(first)
    again = mapper.map([3, 2, 1, 4], writable=True)
    assert gnttab.calls == 2  # only ref 4 was new
    assert [ref_in(v) for v in again.views] == [3, 2, 1, 4]
    mapper.release(again)
    assert mapper.cached == 4 and gnttab.mapped_refs() == 4
    mapper.close()
    assert gnttab.live == [] and mapper.cached == 0


def test_full_cache_maps_new_refs_for_their_request_only() -> None:
    gnttab = FakeGnttab()
    mapper = SegmentMapper(gnttab, 1, persistent=True, max_persistent=4)
    mapper.release(mapper.map([1, 2, 3, 4], True))
    pages = mapper.map([5], True)
    assert len(pages.temporary) == 1 and ref_in(pages.views[0]) == 5
    mapper.release(pages)
    assert gnttab.mapped_refs() == 4 and mapper.cached == 4 and mapper.overflows == 1
    calls = gnttab.calls
    mapper.release(mapper.map([4, 3, 2, 1], True))
    assert gnttab.calls == calls  # the working set stayed cached


def test_overflows_purge_the_least_recently_used() -> None:
    gnttab = FakeGnttab()
    mapper = SegmentMapper(gnttab, 1, persistent=True, max_persistent=10, purge_after=3)
    for ref in range(10):
        mapper.release(mapper.map([ref], True))
    mapper.release(mapper.map([0], True))  # 0 is now the most recent; 1 the least
    mapper.release(mapper.map([20], True))
    mapper.release(mapper.map([21], True))
    assert mapper.cached == 10 and mapper.overflows == 2
    mapper.release(mapper.map([22], True))  # third overflow: purge 10% (one ref), then fits
    assert mapper.cached == 10 and mapper.overflows == 0
    calls = gnttab.calls
    mapper.release(mapper.map([22, 0, 2, 9], True))
    assert gnttab.calls == calls
    mapper.release(mapper.map([1], True))  # 1 was purged
    assert gnttab.calls == calls + 1


def test_a_request_larger_than_the_cache_is_mapped_for_itself() -> None:
    gnttab = FakeGnttab()
    mapper = SegmentMapper(gnttab, 1, persistent=True, max_persistent=4)
    mapper.release(mapper.map([1, 2], True))
    pages = mapper.map([1, 2, 3, 4, 5, 6], True)
    # refs 1 and 2 stay cached (this request uses them); 3..6 cannot all fit: temporary.
    assert [ref_in(v) for v in pages.views] == [1, 2, 3, 4, 5, 6]
    assert len(pages.temporary) == 1 and mapper.cached == 2
    mapper.release(pages)
    assert gnttab.mapped_refs() == 2


def test_shared_mapping_unmapped_only_when_its_last_ref_is_evicted() -> None:
    gnttab = FakeGnttab()
    mapper = SegmentMapper(gnttab, 1, persistent=True, max_persistent=3, purge_after=1)
    mapper.release(mapper.map([1, 2, 3], True))  # one mapping for three refs
    mapper.release(mapper.map([2, 3], True))
    mapper.release(mapper.map([7], True))  # purges 1: the mapping still backs 2 and 3
    assert len(gnttab.live) == 2 and mapper.cached == 3
    mapper.release(mapper.map([8, 9], True))  # purges 2 and 3: their mapping goes
    assert sorted(len(m.refs) for m in gnttab.live) == [1, 2]
    assert mapper.live_mappings == 2


@settings(max_examples=40, deadline=None)
@given(
    bound=st.integers(0, 40),
    requests=st.lists(st.lists(st.integers(0, 120), min_size=1, max_size=20), max_size=40),
    seed=st.integers(0, 2**32),
)
def test_cache_never_exceeds_its_bound_nor_leaks(bound, requests, seed) -> None:
    gnttab = FakeGnttab(granted=110)  # refs 110..120 fail to map
    mapper = SegmentMapper(gnttab, 1, persistent=True, max_persistent=bound, purge_after=2)
    rng = random.Random(seed)
    for refs in requests:
        try:
            pages = mapper.map(refs, rng.random() < 0.5)
        except GrantError:
            assert any(r >= 110 for r in refs)
        else:
            assert all(r < 110 for r in refs)
            assert [ref_in(v) for v in pages.views] == refs
            mapper.release(pages)
        assert mapper.cached <= bound
        # Every mapped page is either cached or gone: no leak between requests.
        assert gnttab.mapped_refs() >= mapper.cached
        assert all(any(m is mapping.pages for m in gnttab.live) for mapping in mapper._mappings)
        assert len(gnttab.live) == mapper.live_mappings
    mapper.close()
    assert gnttab.live == []


def test_a_purge_spares_the_refs_of_every_request_in_flight() -> None:
    """Pipelined blkback: several PageSets are out at once; a purge (here after every
    overflow) must not unmap a page an I/O thread may still be reading or writing."""
    gnttab = FakeGnttab()
    mapper = SegmentMapper(gnttab, 1, persistent=True, max_persistent=8, purge_after=1)
    out = [mapper.map([ref], False) for ref in range(8)]  # 8 requests in flight: cache full
    extra = mapper.map([8], False)  # overflow: a purge, but every cached ref is in use
    assert all(not m.unmapped for m in gnttab.live)
    assert gnttab.mapped_refs() == 9  # the 8 in flight stay; ref 8 is mapped for itself
    assert mapper.cached == 8
    for pages in out[:4] + [extra]:
        mapper.release(pages)
    mapper.map([9], False)  # overflow again: now only released refs may go
    assert {m.refs[0] for m in gnttab.live} >= {4, 5, 6, 7}
    assert mapper.cached <= 8
    mapper.close()
    assert gnttab.mapped_refs() == 0
