"""The platform interface shared by the software Xen and real Xen.

Owns: the abstract classes devices are written against, and the platform exceptions.
Must not: contain an implementation, import cffi, or open anything.

Vocabulary follows Xen's libraries: a *granting* domain shares pages and hands out grant
refs (libxengntshr / gntalloc); a *mapping* domain maps refs of another domain
(libxengnttab / gntdev); event channel ports are bound, notified, unmasked (libxenevtchn).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

from xentools.core.errors import XentoolsError

PAGE_SIZE = 4096


class PlatformError(XentoolsError):
    """A platform call failed (hypercall, device node, service). Message says what and why."""


class GrantError(PlatformError):
    """A grant operation failed: unknown ref, wrong domain, read-only ref mapped writable,
    grant limit reached, or a ref still mapped by its peer when it had to be revoked."""


class GrantStillMapped(GrantError):
    """unshare() could not revoke a grant because the peer still maps it (XSA-396).
    The pages must not be reused; the caller treats the device as failed."""


class EventChannelError(PlatformError):
    """An event channel operation failed: unknown or unbound port, peer gone."""


class XenstoreError(PlatformError):
    """A xenstore request failed. `errno_name` holds the server's error string (e.g. "ENOENT")
    when the server answered with XS_ERROR; None for transport failures and timeouts."""

    def __init__(self, message: str, errno_name: str | None = None) -> None:
        super().__init__(message)
        self.errno_name = errno_name


class XenstoreTimeout(XenstoreError):
    """The xenstore server did not answer in time (or a watched condition never came)."""


class GrantedPages(abc.ABC):
    """Granted pages as this process sees them: the other domain `domid`, one grant ref per
    page, and the pages contiguous in `buf`."""

    domid: int
    refs: tuple[int, ...]
    writable: bool

    @property
    @abc.abstractmethod
    def buf(self) -> memoryview:
        """View of all pages, len == PAGE_SIZE * len(refs) (read-only when not `writable`).
        Invalid once the pages are unshared or unmapped."""


class SharedPages(GrantedPages):
    """Pages this domain shares with `domid`: contiguous writable memory and one ref per page."""


class MappedPages(GrantedPages):
    """Pages of domain `domid` mapped into this process, contiguous in `buf`."""


class GrantSharer(abc.ABC):
    """The granting side (gntshr): share freshly allocated, zeroed pages with another domain."""

    @abc.abstractmethod
    def share(self, domid: int, count: int, writable: bool = True) -> SharedPages:
        """Allocate `count` zeroed pages and grant them to `domid`. Raises GrantError."""

    @abc.abstractmethod
    def unshare(self, pages: SharedPages) -> None:
        """Revoke the grants and release the pages. Raises GrantStillMapped if a peer still
        maps one (the pages are then leaked on purpose, never reused)."""

    @abc.abstractmethod
    def is_mapped(self, pages: SharedPages) -> bool | None:
        """True if the peer maps any of the pages now; None when the platform cannot tell."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the handle. Pages still shared are unshared."""


class GrantMapper(abc.ABC):
    """The mapping side (gnttab): map pages another domain granted."""

    @abc.abstractmethod
    def map(self, domid: int, refs: Sequence[int], writable: bool) -> MappedPages:
        """Map `refs` of `domid` contiguously. Raises GrantError (unknown ref, read-only ref
        asked writable, wrong domain)."""

    @abc.abstractmethod
    def unmap(self, pages: MappedPages) -> None:
        """Unmap; the granter can then revoke."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the handle; unmaps what is still mapped."""


class EventChannels(abc.ABC):
    """An event channel handle (libxenevtchn): many ports, one file descriptor to wait on.

    Delivery follows Xen: a notified port becomes pending and is masked until unmask(); the
    handle's fd becomes readable while a port is pending.

    A compiled wait loop (blkback_ringloop.c's xt_wait) may take, unmask and send a port's
    events itself: `direct_link(port)` hands it what it needs, or None where this handle
    cannot (the default); a link is valid while `links_changed` (a counter moved by every
    bind, unbind, relink and close) has the value the link's `generation` holds. Every link
    has a `kind`: "words" (the software Xen's channel words, evtchn_channel.py) or
    "xenevtchn" (libxenevtchn's handle and functions, real Xen).
    """

    links_changed: int = 0

    @abc.abstractmethod
    def fileno(self) -> int:
        """File descriptor that is readable when pending() has something to return."""

    @abc.abstractmethod
    def bind_unbound(self, remote_domid: int) -> int:
        """Allocate a port that `remote_domid` may bind to. Returns the local port."""

    @abc.abstractmethod
    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Bind to `remote_port` of `remote_domid` (which must be unbound and offered to us)."""

    @abc.abstractmethod
    def notify(self, port: int) -> None:
        """Send an event to the other end of `port`. Raises EventChannelError if not bound."""

    @abc.abstractmethod
    def pending(self) -> int | None:
        """Return one pending port (it stays masked until unmask), or None. Never blocks."""

    @abc.abstractmethod
    def unmask(self, port: int) -> None:
        """Unmask `port`; an event that arrived while masked is delivered again."""

    @abc.abstractmethod
    def unbind(self, port: int) -> None:
        """Close `port`; the peer's notify then fails or is dropped."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unbind every port and release the handle."""

    def direct_link(self, port: int):  # -> a link with `kind` and `generation`, or None
        """The raw parts of bound `port` for a compiled wait loop, or None: this handle
        cannot hand them (the default), or not for this port now."""
        return None


class Platform(abc.ABC):
    """One domain's view of a Xen: real or software.

    `full_barrier` is a real full memory barrier (store->load ordering across CPUs), or None
    when this platform cannot provide one; the ring then always notifies and re-checks.
    """

    name: str  # "xen" or "software"
    domid: int
    full_barrier: Callable[[], None] | None

    @abc.abstractmethod
    def open_gntshr(self) -> GrantSharer: ...

    @abc.abstractmethod
    def open_gnttab(self) -> GrantMapper: ...

    @abc.abstractmethod
    def open_evtchn(self) -> EventChannels: ...

    @abc.abstractmethod
    def open_xenstore(self, timeout: float = 10.0):  # -> xentools.platform.xenstore.XenstoreClient
        """A connected xenstore client acting as this domain."""

    def close(self) -> None:
        """Release what the platform object itself holds (handles opened are closed by callers)."""
