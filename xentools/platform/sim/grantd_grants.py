"""grantd's grant service: the grant table of every simulated domain.

Owns: grants (per granting domain, refs from 8 up to 32767: 64 grant frames of 512 v1
entries, Xen's default; refs 0..7 are GNTTAB_NR_RESERVED_ENTRIES), the maps peers hold, grant
copy, and what a gntshr or gnttab handle leaves behind when it goes away.
Must not: touch granted memory except for grant copy (pages live in each granter's own memfd
and are mapped by the peers themselves), know about sockets or event channels, or know blkif.

Semantics, following Xen:
- Only the grant's target domain may map or copy it; a read-only grant is never mapped
  writable and the mapper then receives a read-only file descriptor.
- A grant that is still mapped when its granter revokes it (unshare or disconnect) is not
  freed (XSA-396): it stops being mappable and is freed when its last map goes away.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

from xentools.platform.interface import PAGE_SIZE, GrantError, GrantStillMapped, PlatformError
from xentools.platform.sim.grantd_wire import (
    GNTTAB_NR_RESERVED_ENTRIES,
    MAX_COPY_BYTES,
    MAX_COPY_SEGMENTS,
    MAX_FDS,
    MAX_MAP_REFS,
    MAX_SHARE_PAGES,
    NR_GRANT_ENTRIES,
    Message,
    Op,
    Reply,
    WireError,
    close_fds,
    domid_ok,
    need_ints,
)


@dataclass(eq=False)
class _File:
    """A granter's memfd as the service holds it (read-write and read-only descriptors)."""

    file_id: int
    fd: int
    ro_fd: int

    def close(self) -> None:
        close_fds({self.fd, self.ro_fd})


@dataclass(eq=False)
class GrantClient:
    """What one gntshr or gnttab handle holds in the grant table."""

    domid: int
    file: _File | None = None
    refs: set[int] = field(default_factory=set)
    maps: dict[int, list[_Grant]] = field(default_factory=dict)


@dataclass(eq=False)
class _Grant:
    granter: int
    ref: int
    target: int
    file: _File
    page: int
    writable: bool
    owner: GrantClient | None
    maps: int = 0
    revoking: bool = False


class _RefAllocator:
    """Grant refs of one granting domain: fresh refs first, then the longest-free ref, so a
    stale ref held by a buggy peer is unlikely to name a new grant soon."""

    def __init__(self) -> None:
        self._next = GNTTAB_NR_RESERVED_ENTRIES
        self._free: deque[int] = deque()

    def alloc(self) -> int | None:
        if self._next < NR_GRANT_ENTRIES:
            self._next += 1
            return self._next - 1
        return self._free.popleft() if self._free else None

    def free(self, ref: int) -> None:
        self._free.append(ref)



class GrantTable:
    """The grant tables of every domain. Each op_* handler takes the client and its request
    and returns the reply with the descriptors it carries; errors are raised."""

    def __init__(self) -> None:
        self._grants: dict[tuple[int, int], _Grant] = {}
        self._refs: dict[int, _RefAllocator] = {}
        self._clients: set[GrantClient] = set()
        self._next_file_id = 1
        self._next_map_id = 1

    def open_sharer(self, domid: int, memfd: int) -> GrantClient:
        """A gntshr handle of `domid` whose pages live in `memfd` (now owned here)."""
        try:
            # A mapper of a read-only grant gets a descriptor opened read-only, so it cannot
            # map the page writable even by calling mmap itself.
            ro_fd = os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            ro_fd = memfd
        client = GrantClient(domid, _File(self._next_file_id, memfd, ro_fd))
        self._next_file_id += 1
        self._clients.add(client)
        return client

    def open_mapper(self, domid: int) -> GrantClient:
        """A gnttab handle of `domid`."""
        client = GrantClient(domid)
        self._clients.add(client)
        return client

    def release(self, client: GrantClient) -> None:
        """The handle said BYE or went away: revoke its grants, drop its maps."""
        for ref in list(client.refs):
            self._revoke(self._grants[(client.domid, ref)])
        client.refs.clear()
        if client.file is not None:
            client.file.close()
            client.file = None
        for map_id in list(client.maps):
            self._unmap(client, map_id)
        self._clients.discard(client)

    def _own_grant(self, client: GrantClient, ref: int) -> _Grant:
        if ref not in client.refs:
            raise GrantError(
                f"grant.unknown_ref: ref {ref} is not shared by this handle of domain {client.domid}"
            )
        return self._grants[(client.domid, ref)]

    def _free_grant(self, grant: _Grant) -> None:
        del self._grants[(grant.granter, grant.ref)]
        self._refs[grant.granter].free(grant.ref)

    def _revoke(self, grant: _Grant) -> bool:
        """End foreign access; a still-mapped grant stays until its last unmap (XSA-396)."""
        if grant.owner is not None:
            grant.owner.refs.discard(grant.ref)
            grant.owner = None
        if grant.maps:
            grant.revoking = True
            return False
        self._free_grant(grant)
        return True

    def op_share(self, client: GrantClient, msg: Message, fds: list[int]) -> Reply:
        need_ints(msg, 3, at_least=True)
        target, writable, *pages = msg.ints
        if not domid_ok(target):
            raise GrantError(f"grant.bad_domid: {target} is not a domain id")
        if len(pages) > MAX_SHARE_PAGES:
            raise GrantError(f"grant.count: {len(pages)} pages > {MAX_SHARE_PAGES} in one share")
        if any(p < 0 or p > (1 << 40) for p in pages):
            raise WireError("grantd.bad_page: page offset out of range")
        if client.file is None:
            raise PlatformError("grantd.closed: this gntshr handle said BYE")
        alloc = self._refs.setdefault(client.domid, _RefAllocator())
        refs: list[int] = []
        for page in pages:
            ref = alloc.alloc()
            if ref is None:
                for r in refs:
                    self._free_grant(self._grants[(client.domid, r)])
                    client.refs.discard(r)
                raise GrantError(
                    f"grant.table_full: domain {client.domid} has no free grant entry "
                    f"({NR_GRANT_ENTRIES} entries)"
                )
            self._grants[(client.domid, ref)] = _Grant(
                client.domid, ref, target, client.file, page, bool(writable), client
            )
            client.refs.add(ref)
            refs.append(ref)
        return Message(Op.OK, tuple(refs)), []

    def op_unshare(self, client: GrantClient, msg: Message, fds: list[int]) -> Reply:
        grants = [self._own_grant(client, ref) for ref in msg.ints]
        still = [g.ref for g in grants if not self._revoke(g)]
        if still:
            err = GrantStillMapped(
                f"grant.still_mapped: domain {client.domid} refs {still} are still mapped by "
                f"their peer; they are revoked once unmapped and the pages must not be reused "
                f"(XSA-396)"
            )
            err.refs = tuple(still)  # type: ignore[attr-defined]
            raise err
        return Message(Op.OK), []

    def op_is_mapped(self, client: GrantClient, msg: Message, fds: list[int]) -> Reply:
        grants = [self._own_grant(client, ref) for ref in msg.ints]
        return Message(Op.OK, (int(any(g.maps for g in grants)),)), []

    def op_map(self, client: GrantClient, msg: Message, fds: list[int]) -> Reply:
        need_ints(msg, 3, at_least=True)
        granter, writable, *refs = msg.ints
        if len(refs) > MAX_MAP_REFS:
            raise GrantError(f"grant.count: {len(refs)} refs > {MAX_MAP_REFS} in one map")
        grants = [self._mappable(client, granter, ref, bool(writable)) for ref in refs]
        files: dict[_File, int] = {}
        out: list[int] = []
        for g in grants:
            index = files.setdefault(g.file, len(files))
            out += (index, g.page)
        if len(files) > MAX_FDS:
            raise GrantError(
                f"grant.too_many_files: refs come from {len(files)} handles of domain "
                f"{granter}, at most {MAX_FDS} per map"
            )
        for g in grants:
            g.maps += 1
        map_id = self._next_map_id
        self._next_map_id += 1
        client.maps[map_id] = grants
        return Message(Op.OK, (map_id, len(files), *out)), [f.fd if writable else f.ro_fd for f in files]

    def _mappable(self, client: GrantClient, granter: int, ref: int, writable: bool) -> _Grant:
        grant = self._grants.get((granter, ref))
        if grant is None:
            raise GrantError(f"grant.unknown_ref: domain {granter} has no grant ref {ref}")
        if grant.target != client.domid:
            raise GrantError(
                f"grant.wrong_domain: ref {ref} of domain {granter} is granted to domain "
                f"{grant.target}, not to domain {client.domid}"
            )
        if grant.revoking:
            raise GrantError(f"grant.revoked: ref {ref} of domain {granter} is being revoked")
        if writable and not grant.writable:
            raise GrantError(
                f"grant.readonly: ref {ref} of domain {granter} is granted read-only, "
                f"asked writable"
            )
        return grant

    def op_unmap(self, client: GrantClient, msg: Message, fds: list[int]) -> Reply:
        need_ints(msg, 1)
        (map_id,) = msg.ints
        if map_id not in client.maps:
            raise GrantError(f"grant.unknown_map: map {map_id} is not held by this handle")
        self._unmap(client, map_id)
        return Message(Op.OK), []

    def _unmap(self, client: GrantClient, map_id: int) -> None:
        for grant in client.maps.pop(map_id):
            grant.maps -= 1
            if grant.maps == 0 and grant.revoking:
                self._free_grant(grant)

    def op_copy(self, client: GrantClient, msg: Message, fds: list[int]) -> Reply:
        need_ints(msg, 1, at_least=True)
        n = msg.ints[0]
        if not 0 <= n <= MAX_COPY_SEGMENTS:
            raise GrantError(f"grant.copy_count: {n} segments > {MAX_COPY_SEGMENTS}")
        need_ints(msg, 1 + 5 * n)
        segs = []
        blob_used = 0
        total = 0
        for i in range(n):
            to_grant, domid, ref, offset, length = msg.ints[1 + 5 * i : 6 + 5 * i]
            if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
                raise GrantError(
                    f"grant.copy_bounds: offset {offset} + length {length} exceeds the "
                    f"{PAGE_SIZE}-byte page of ref {ref}"
                )
            grant = self._mappable(client, domid, ref, bool(to_grant))
            segs.append((bool(to_grant), grant, offset, length))
            total += length
            if to_grant:
                blob_used += length
        if total > MAX_COPY_BYTES:
            raise GrantError(f"grant.copy_size: {total} bytes > {MAX_COPY_BYTES} in one copy")
        if blob_used != len(msg.blob):
            raise WireError(f"grantd.copy_blob: {len(msg.blob)} bytes sent, {blob_used} expected")
        out = bytearray()
        pos = 0
        for to_grant, grant, offset, length in segs:
            where = grant.page * PAGE_SIZE + offset
            if to_grant:
                os.pwrite(grant.file.fd, msg.blob[pos : pos + length], where)
                pos += length
            else:
                data = os.pread(grant.file.fd, length, where)
                out += data.ljust(length, b"\0")  # a page past EOF reads as zeroes
        return Message(Op.OK, (), bytes(out)), []

    def state(self) -> dict:
        """The grants and maps as plain data."""
        return {
            "grants": [
                {
                    "domid": g.granter,
                    "ref": g.ref,
                    "target": g.target,
                    "writable": g.writable,
                    "maps": g.maps,
                    "revoking": g.revoking,
                }
                for g in self._grants.values()
            ],
            "maps": [
                {"domid": c.domid, "map_id": mid, "refs": [[g.granter, g.ref] for g in gs]}
                for c in self._clients
                for mid, gs in c.maps.items()
            ],
        }
