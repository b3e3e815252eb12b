"""An event channel's shared page: one state word per end and its atomic transitions.

Owns: the layout of the page grantd creates for each event channel (one 32-bit word per end
holding that port's pending, masked, ready, bound and closed bits) and the transitions both
ends and grantd apply to those words with compare-and-swap: raise an event, take a delivered
event, unmask, close. With them Xen's event channel rules hold without a daemon on the path:
a notify is one compare-and-swap on the peer's word and, when it delivers, one byte written
to the peer handle's doorbell pipe.
Must not: talk to grantd, keep a port table, or block.

The rules are Xen's evtchn_set_pending()/evtchn_unmask() with the delivery of Linux's evtchn
driver (which masks a port when it hands it to the reader, the pending bit being cleared as
the interrupt is acknowledged):
- raise (a notify, applied to the peer's word): PENDING already set: nothing (a pending bit,
  not a counter). Else MASKED: set PENDING. Else deliver: set MASKED and READY.
- take (the owner's pending()): clear READY.
- unmask (the owner): clear MASKED; if PENDING was set, deliver instead (PENDING cleared,
  MASKED and READY set).
- close (grantd): set CLOSED; the old value carries the port's state to its next page.
Exactly one party makes a given delivery, and it rings the owner's doorbell once (one byte
in a pipe, read one byte per taken port), so a handle's fd is readable exactly while a
delivered port waits.
Only the two ends of a channel (and grantd) hold its page: a hostile peer can disturb the
channel it is on and no other.
"""

from __future__ import annotations

import fcntl
import os
import threading

from xentools.platform import barrier
from xentools.platform.interface import PAGE_SIZE, EventChannelError
from xentools.platform.sim.grants import PageMapping

PENDING = 0x1
MASKED = 0x2
READY = 0x4  # delivered, not yet returned by pending()
BOUND = 0x8  # the port is interdomain-bound on this page (set by grantd)
CLOSED = 0x10  # this page is no longer the port's: ask grantd where it went
PORT_STATE = PENDING | MASKED | READY  # what a port keeps when it moves to a new page

WORD_STRIDE = 64  # bytes: each end's word in its own cache line
_CELLS_PER_WORD = WORD_STRIDE // 4
MAX_TRIES = 10000  # compare-and-swap attempts before a word is declared fought over

# Outcomes of a transition.
NOTHING = 0
DELIVERED = 1
GONE = 2  # the word says CLOSED

_UNSET = object()
_cas: object = _UNSET  # the machine compare-and-swap, made on first use (None: lock instead)
_fallback_lock = threading.Lock()


def machine_cas():  # -> Callable[[int, int, int], int] | None
    """The compare-and-swap the words use, or None where the POSIX-lock fallback is used."""
    global _cas
    if _cas is _UNSET:
        _cas = barrier.compare_and_swap32()
    return _cas


def create_page_fd() -> int:
    """A new sealed one-page memfd for a channel: nobody holding it can shrink or grow it
    (a shrunk page would kill every process mapping it with SIGBUS)."""
    fd = os.memfd_create("xentools-evtchn", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, PAGE_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ChannelPage:
    """One process's mapping of a channel page (it owns `fd` and closes it with the page)."""

    def __init__(self, fd: int) -> None:
        if os.fstat(fd).st_size < PAGE_SIZE:
            raise EventChannelError("evtchn.bad_page: the channel page is smaller than a page")
        self.fd = fd
        self._mapping: PageMapping | None = PageMapping([(fd, 0, 1)], writable=True)
        self.addr = self._mapping.addr
        self._cells = self._mapping.view.cast("I")

    def word(self, end: int) -> int:
        """The current value of end `end`'s word (one aligned 32-bit load)."""
        return self._cells[end * _CELLS_PER_WORD]

    def _swap(self, end: int, old: int, new: int) -> int:
        cas = _cas if _cas is not _UNSET else machine_cas()
        if cas is not None:
            return cas(self.addr + end * WORD_STRIDE, old, new)  # type: ignore[operator]
        # No machine compare-and-swap here: a POSIX record lock on the word excludes the
        # other processes, the module lock this process's other threads.
        offset = end * WORD_STRIDE
        with _fallback_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 4, offset)
            try:
                cur = self._cells[offset // 4]
                if cur == old:
                    self._cells[offset // 4] = new
                return cur
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 4, offset)

    # The three hot transitions are written out (no step functions): each is one load and,
    # when the word must change, one compare-and-swap, retried only if a peer changed it.

    def raise_event(self, end: int) -> int:
        """A notify on the port at `end`: DELIVERED (ring its owner's doorbell), NOTHING, or
        GONE when the page is no longer that port's."""
        old = self._cells[end * _CELLS_PER_WORD]
        for _ in range(MAX_TRIES):
            if old & CLOSED:
                return GONE
            if old & PENDING:
                return NOTHING  # a pending bit, not a counter
            new = old | PENDING if old & MASKED else old | MASKED | READY
            seen = self._swap(end, old, new)
            if seen == old:
                return NOTHING if old & MASKED else DELIVERED
            old = seen
        raise _contended()

    def take(self, end: int) -> int:
        """The owner takes a delivered event: DELIVERED if one was waiting, NOTHING, GONE."""
        old = self._cells[end * _CELLS_PER_WORD]
        for _ in range(MAX_TRIES):
            if old & CLOSED:
                return GONE
            if not old & READY:
                return NOTHING
            seen = self._swap(end, old, old & ~READY)
            if seen == old:
                return DELIVERED
            old = seen
        raise _contended()

    def unmask(self, end: int) -> int:
        """The owner unmasks: DELIVERED when an event was pending (ring the own doorbell),
        NOTHING, or GONE."""
        old = self._cells[end * _CELLS_PER_WORD]
        for _ in range(MAX_TRIES):
            if old & CLOSED:
                return GONE
            if not old & MASKED:
                return NOTHING
            if old & PENDING:  # delivered again, as Xen's evtchn_unmask() does
                new = (old & ~PENDING) | READY
            else:
                new = old & ~MASKED
            seen = self._swap(end, old, new)
            if seen == old:
                return DELIVERED if old & PENDING else NOTHING
            old = seen
        raise _contended()

    def set_bits(self, end: int, bits: int) -> int:
        """grantd: set `bits` in a word (BOUND, CLOSED); returns the old value. A word fought
        over by a hostile peer is simply overwritten: grantd's word is final."""
        old = self._cells[end * _CELLS_PER_WORD]
        for _ in range(MAX_TRIES):
            seen = self._swap(end, old, old | bits)
            if seen == old:
                return old
            old = seen
        self._cells[end * _CELLS_PER_WORD] = old | bits
        return old

    def init_word(self, end: int, value: int) -> None:
        """grantd: the first value of a word no process uses yet."""
        self._cells[end * _CELLS_PER_WORD] = value

    def close(self) -> None:
        """Unmap the page and close its descriptor."""
        mapping, self._mapping = self._mapping, None
        if mapping is None:
            return
        self._cells.release()
        mapping.unmap()
        os.close(self.fd)


def _contended() -> EventChannelError:
    return EventChannelError(
        "evtchn.contended: the channel word changed on every attempt (the peer is writing "
        "it in a loop)"
    )
