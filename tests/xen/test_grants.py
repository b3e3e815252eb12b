"""Grants on real Xen: dom0 shares pages with itself (gntalloc) and maps them (gntdev).

Owns: proof that XenGrantSharer / XenGrantMapper drive Linux gntalloc and gntdev correctly:
data written on one side is seen on the other, a read-only grant refuses a writable
mapping, grant copy moves bytes both ways, the gntalloc limit fails cleanly, and a grant
unshared while still mapped is quarantined rather than reused (XSA-396).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from xentools.platform.interface import PAGE_SIZE, GrantError
from xentools.platform.xen import GrantCopySegment

DOM0 = 0


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(n))


def test_shared_pages_are_zeroed_and_refs_distinct(gntshr):
    pages = gntshr.share(DOM0, 3)
    try:
        assert len(pages.refs) == 3 and len(set(pages.refs)) == 3
        assert pages.domid == DOM0 and pages.writable
        assert len(pages.buf) == 3 * PAGE_SIZE
        assert bytes(pages.buf) == bytes(3 * PAGE_SIZE)
    finally:
        gntshr.unshare(pages)


def test_share_then_map_both_directions(gntshr, gnttab):
    shared = gntshr.share(DOM0, 2)
    shared.buf[:] = pattern(1, 2 * PAGE_SIZE)
    mapped = gnttab.map(DOM0, shared.refs, writable=True)
    try:
        assert bytes(mapped.buf) == pattern(1, 2 * PAGE_SIZE)
        # The mapping is the same machine page, not a copy: writes show through at once.
        mapped.buf[PAGE_SIZE : PAGE_SIZE + 5] = b"xen!!"
        assert bytes(shared.buf[PAGE_SIZE : PAGE_SIZE + 5]) == b"xen!!"
        shared.buf[0:3] = b"abc"
        assert bytes(mapped.buf[0:3]) == b"abc"
    finally:
        gnttab.unmap(mapped)
        gntshr.unshare(shared)


def test_map_refs_in_any_order_is_contiguous(gntshr, gnttab):
    shared = gntshr.share(DOM0, 3)
    for i in range(3):
        shared.buf[i * PAGE_SIZE] = 0x10 + i
    mapped = gnttab.map(DOM0, list(reversed(shared.refs)), writable=False)
    try:
        assert [mapped.buf[i * PAGE_SIZE] for i in range(3)] == [0x12, 0x11, 0x10]
    finally:
        gnttab.unmap(mapped)
        gntshr.unshare(shared)


def test_read_only_grant_refuses_writable_mapping(gntshr, gnttab):
    shared = gntshr.share(DOM0, 1, writable=False)
    shared.buf[:4] = b"ro!!"
    try:
        with pytest.raises(GrantError) as info:
            gnttab.map(DOM0, shared.refs, writable=True)
        assert info.value.errno != 0
        assert "xengnttab_map_domain_grant_refs" in str(info.value)
        mapped = gnttab.map(DOM0, shared.refs, writable=False)
        try:
            assert bytes(mapped.buf[:4]) == b"ro!!"
            assert mapped.buf.readonly
            with pytest.raises(TypeError):
                mapped.buf[0] = 1
        finally:
            gnttab.unmap(mapped)
    finally:
        gntshr.unshare(shared)


def test_unknown_ref_is_a_grant_error(gntshr, gnttab):
    shared = gntshr.share(DOM0, 1)
    try:
        bogus = max(shared.refs) + 100_000  # far beyond any ref in use
        with pytest.raises(GrantError):
            gnttab.map(DOM0, [bogus], writable=False)
    finally:
        gntshr.unshare(shared)


def test_grant_copy_both_ways(gntshr, gnttab):
    assert gnttab.has_grant_copy, "Xen 4.17's libxengnttab has xengnttab_grant_copy (1.1)"
    shared = gntshr.share(DOM0, 2)
    shared.buf[:] = pattern(3, 2 * PAGE_SIZE)
    try:
        segments = [
            GrantCopySegment(DOM0, shared.refs[1], 512, 1024),
            GrantCopySegment(DOM0, shared.refs[0], 0, PAGE_SIZE),
        ]
        into = bytearray(1024 + PAGE_SIZE)
        gnttab.copy_from_grants(segments, into)
        expect = pattern(3, 2 * PAGE_SIZE)
        assert bytes(into) == expect[PAGE_SIZE + 512 : PAGE_SIZE + 1536] + expect[:PAGE_SIZE]

        gnttab.copy_to_grants(b"Q" * 100, [GrantCopySegment(DOM0, shared.refs[0], 4000, 96),
                                           GrantCopySegment(DOM0, shared.refs[1], 0, 4)])
        assert bytes(shared.buf[4000:4096]) == b"Q" * 96
        assert bytes(shared.buf[PAGE_SIZE : PAGE_SIZE + 4]) == b"QQQQ"
        assert shared.buf[3999] == expect[3999]
    finally:
        gntshr.unshare(shared)


def test_grant_copy_to_read_only_grant_reports_status(gntshr, gnttab):
    shared = gntshr.share(DOM0, 1, writable=False)
    try:
        with pytest.raises(GrantError, match="GNTST"):
            gnttab.copy_to_grants(b"x" * 8, [GrantCopySegment(DOM0, shared.refs[0], 0, 8)])
        assert bytes(shared.buf[:8]) == bytes(8)
    finally:
        gntshr.unshare(shared)


def test_unshare_while_mapped_keeps_the_page_out_of_reuse(gntshr, gnttab):
    # Linux gntalloc ends foreign access itself; with the peer still mapping, the page is
    # kept aside (XSA-396) rather than freed, so the mapper still sees the old data and
    # the granter's unshare does not fail.
    shared = gntshr.share(DOM0, 1)
    shared.buf[:6] = b"before"
    mapped = gnttab.map(DOM0, shared.refs, writable=False)
    gntshr.unshare(shared)
    with pytest.raises(GrantError):
        shared.buf  # noqa: B018 - the view is gone after unshare
    try:
        assert bytes(mapped.buf[:6]) == b"before"
    finally:
        gnttab.unmap(mapped)


def test_double_unshare_and_foreign_pages_are_refused(gntshr, gnttab, platform):
    shared = gntshr.share(DOM0, 1)
    gntshr.unshare(shared)
    with pytest.raises(GrantError, match="not shared by this handle"):
        gntshr.unshare(shared)
    other = platform.open_gntshr()
    try:
        theirs = other.share(DOM0, 1)
        with pytest.raises(GrantError):
            gntshr.unshare(theirs)
        other.unshare(theirs)
    finally:
        other.close()


def test_close_releases_what_is_still_shared(platform):
    sharer = platform.open_gntshr()
    sharer.share(DOM0, 2)
    sharer.close()
    assert sharer.shared == ()
    with pytest.raises(GrantError, match="closed"):
        sharer.share(DOM0, 1)


def test_gntalloc_limit_fails_cleanly_and_shares_are_released(gntshr):
    # gntalloc counts every grant of every process against its `limit` parameter. Sharing
    # the whole limit twice in a row passes only if unshare really gave the grants back.
    limit = int(Path("/sys/module/xen_gntalloc/parameters/limit").read_text())
    with pytest.raises(GrantError) as info:
        gntshr.share(DOM0, limit + 1)
    assert info.value.errno == errno.ENOSPC
    for _ in range(2):
        pages = gntshr.share(DOM0, limit)
        assert len(pages.refs) == limit
        gntshr.unshare(pages)
