"""blkback grant mapping for one ring: per-request maps and the persistent-grant cache.

Owns: `SegmentMapper`, which turns the grant refs of one request into page views, either
through one contiguous map per request (then unmapped before the response is pushed) or,
with feature-persistent negotiated, through a bounded per-ring cache ref -> mapped page.
Must not: read requests, do disk I/O, or outlive its ring: close() unmaps everything.

Rules followed:
- XSA-365/371: every map result is checked (the platform's map is all-or-nothing and raises
  GrantError; nothing is cached from a failed map), and no persistent grant leaks: the cache
  is bounded (`max_persistent`, Linux's default 1056 per ring), an evicted entry is unmapped
  as soon as no cached ref uses its mapping, and close() unmaps all of them.
- blkif.h note 8: with persistent grants the frontend must let the backend map every grant
  writable, so cached pages are always mapped writable (a later request may read into them).
- XSA-396 (the frontend's side of it): a non-persistent map is released before the response
  is published, so the frontend can revoke the grant as soon as it sees the response.
- A ref named by a request is never evicted while that request uses it: every PageSet handed
  out stays in `_in_use` until release(), and a purge spares the refs of all of them (the
  ring thread maps and releases; I/O threads only read and write the pages).
- When the cache is full, new refs are mapped for their request only (as Linux blkback does
  once it holds max_persistent_grants), so a frontend cycling through more grants than the
  cache holds does not make every request unmap and remap a whole cache's worth. Every
  `purge_after` (PURGE_AFTER) such overflows, the least recently used PURGE_FRACTION of the cache is
  unmapped (Linux purges 10% of the unused grants), so a new working set can settle in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from xentools.platform.interface import PAGE_SIZE, GrantError, GrantMapper, MappedPages

__all__ = ["DEFAULT_MAX_PERSISTENT_GRANTS", "PageSet", "SegmentMapper"]

# Linux blkback's max_persistent_grants default (per ring).
DEFAULT_MAX_PERSISTENT_GRANTS = 1056
PURGE_AFTER = 64  # overflowing requests between two purges
PURGE_FRACTION = 0.1  # of max_persistent, least recently used first


class _Mapping:
    """One platform mapping shared by the cache entries of its refs."""

    __slots__ = ("pages", "live")

    def __init__(self, pages: MappedPages, live: int) -> None:
        self.pages = pages
        self.live = live


class PageSet:
    """The pages of one request: `views[i]` is the 4 KiB page of the i-th ref given, or
    `contiguous` (all pages back to back) when they come from one temporary map."""

    __slots__ = ("views", "contiguous", "temporary", "refs")

    def __init__(self, refs: Sequence[int] = ()) -> None:
        self.views: list[memoryview] = []
        self.contiguous: memoryview | None = None
        self.temporary: list[MappedPages] = []
        self.refs = refs  # the refs whose cached pages this set uses


class SegmentMapper:
    """Maps the refs of domain `domid` for one ring's requests."""

    def __init__(
        self, gnttab: GrantMapper, domid: int, *, persistent: bool,
        max_persistent: int = DEFAULT_MAX_PERSISTENT_GRANTS, purge_after: int = PURGE_AFTER,
    ) -> None:
        if max_persistent < 0:
            raise ValueError("max_persistent must be >= 0")
        self.gnttab = gnttab
        self.domid = domid
        self.persistent = persistent
        self.max_persistent = max_persistent
        self.purge_after = purge_after
        # ref -> (mapping, view of its page); order is least recently used first.
        self._cache: OrderedDict[int, tuple[_Mapping, memoryview]] = OrderedDict()
        self._mappings: set[_Mapping] = set()
        self._in_use: set[PageSet] = set()  # handed out by map(), not yet released
        # The compiled ring loop's copy of the cache (blkback_ringloop.GrefTable): every ref
        # put into or taken out of the cache is put into or taken out of it too.
        self.table = None
        self.maps = 0  # platform map calls made (for tests and the profile)
        self.overflows = 0  # requests whose new refs did not fit, since the last purge
        self._closed = False

    @property
    def cached(self) -> int:
        """Number of refs in the persistent-grant cache."""
        return len(self._cache)

    @property
    def live_mappings(self) -> int:
        """Platform mappings held by the cache."""
        return len(self._mappings)

    def map(self, grefs: Sequence[int], writable: bool) -> PageSet:
        """Pages for `grefs` (in order; a ref may repeat). Raises GrantError from the
        platform when a ref cannot be mapped; nothing stays mapped for this call then."""
        if self._closed:
            raise RuntimeError("SegmentMapper is closed")
        pages = PageSet()
        if not self.persistent:
            mapped = self.gnttab.map(self.domid, grefs, writable)
            self.maps += 1
            pages.temporary.append(mapped)
            pages.contiguous = mapped.buf
            return pages
        cache = self._cache
        entries = [cache.get(ref) for ref in grefs]
        touch = cache.move_to_end
        pages.refs = grefs
        self._in_use.add(pages)
        if None not in entries:  # the steady state: every page already mapped
            for ref in grefs:
                touch(ref)
            pages.views = [entry[1] for entry in entries]  # type: ignore[index]
            return pages
        views: list[memoryview | None] = []
        missing: dict[int, None] = {}
        for ref, entry in zip(grefs, entries):
            if entry is None:
                missing[ref] = None
                views.append(None)
            else:
                touch(ref)
                views.append(entry[1])
        new = list(missing)
        # blkif.h note 8: persistent grants are mapped writable whatever this request does.
        try:
            mapped = self.gnttab.map(self.domid, new, True)
        except BaseException:
            self._in_use.discard(pages)
            raise
        self.maps += 1
        buf = mapped.buf
        fresh = {ref: buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i, ref in enumerate(new)}
        if self._make_room(len(new)):
            mapping = _Mapping(mapped, len(new))
            self._mappings.add(mapping)
            table = self.table
            for ref, view in fresh.items():
                cache[ref] = (mapping, view)
                if table is not None:
                    table.put(ref, view)
        else:
            pages.temporary.append(mapped)
        for i, ref in enumerate(grefs):
            if views[i] is None:
                views[i] = fresh[ref]
        pages.views = views  # type: ignore[assignment]
        return pages

    def map_many(self, requests: Sequence[Sequence[int]], writable: bool) -> tuple[list[PageSet], MappedPages] | None:
        """Without persistent grants: the pages of several requests in ONE platform map.
        Returns a PageSet per request (slices of one mapping; release() leaves them alone)
        and the mapping, which the caller unmaps with unmap() once every request is done.
        None when some ref cannot be mapped: then nothing is mapped, and the caller maps each
        request on its own so that only the bad one fails."""
        if self._closed:
            raise RuntimeError("SegmentMapper is closed")
        refs = [ref for group in requests for ref in group]
        try:
            mapped = self.gnttab.map(self.domid, refs, writable)
        except GrantError:
            return None
        self.maps += 1
        buf = mapped.buf
        sets = []
        at = 0
        for group in requests:
            pages = PageSet()
            pages.contiguous = buf[at * PAGE_SIZE : (at + len(group)) * PAGE_SIZE]
            at += len(group)
            sets.append(pages)
        return sets, mapped

    def unmap(self, mapped: MappedPages) -> None:
        """Unmap a mapping returned by map_many()."""
        self.gnttab.unmap(mapped)

    def _make_room(self, count: int) -> bool:
        """True if `count` more refs fit; else count an overflow and, every PURGE_AFTER
        overflows, unmap the least recently used refs no request in flight uses."""
        if len(self._cache) + count <= self.max_persistent:
            return True
        self.overflows += 1
        if self.overflows < self.purge_after:
            return False
        self.overflows = 0
        keep = {ref for pages in self._in_use for ref in pages.refs}
        victims = []
        want = max(1, int(self.max_persistent * PURGE_FRACTION), count)
        for ref in self._cache:
            if len(victims) >= want:
                break
            if ref not in keep:
                victims.append(ref)
        for ref in victims:
            self._evict(ref)
        return len(self._cache) + count <= self.max_persistent

    def _evict(self, ref: int) -> None:
        mapping, _ = self._cache.pop(ref)
        if self.table is not None:
            self.table.remove(ref)  # before its page can be unmapped
        mapping.live -= 1
        if mapping.live == 0:
            self._mappings.discard(mapping)
            self.gnttab.unmap(mapping.pages)

    def release(self, pages: PageSet) -> None:
        """Unmap what was mapped for this request only (before the response is pushed)."""
        self._in_use.discard(pages)
        pages.views = []
        pages.contiguous = None
        temporary, pages.temporary = pages.temporary, []
        for mapped in temporary:
            self.gnttab.unmap(mapped)

    def close(self) -> None:
        """Unmap every cached grant (disconnect). Idempotent."""
        if self._closed:
            return
        self._closed = True
        mappings, self._mappings = self._mappings, set()
        if self.table is not None:
            self.table.clear()
        self._cache.clear()
        self._in_use.clear()
        first_error: BaseException | None = None
        for mapping in mappings:
            try:
                self.gnttab.unmap(mapping.pages)
            except Exception as err:  # keep unmapping the rest; report the first failure
                first_error = first_error or err
        if first_error is not None:
            raise first_error
