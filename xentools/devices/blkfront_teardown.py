"""blkfront's one teardown path: every resource released once, in reverse order.

Owns: `Teardown`, the list of releases of one device. A resource is registered once, right
after it was acquired (`on_close(what, release)`), and `close()` releases everything in the
reverse order of acquisition (Linux blkfront's blkif_free: the data grants before the rings,
the rings before the event channels and the grant handle, the xenstore handle last).
Every release is attempted even if an earlier one failed; each failure is kept as one line
"<what>: <error>" (`errors`) for the device's close report. `close()` is idempotent.
Must not: know what it releases (callers pass the release), wait for a peer (the xenbus close
comes before it: pages are unshared only after the backend unmapped them), or swallow
BaseException (KeyboardInterrupt and SystemExit still stop the caller, after the rest ran).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

__all__ = ["Teardown"]


class Teardown:
    """The releases of one device, run in reverse order by `close()` (once)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.errors: list[str] = []
        self.closed = False

    def on_close(self, what: str, release: Callable[[], object]) -> None:
        """Register `release` (acquired just now); `what` names it in an error line."""
        if self.closed:
            raise RuntimeError(f"{what} acquired after the device was torn down")
        self._stack.callback(self._attempt, what, release)

    def _attempt(self, what: str, release: Callable[[], object]) -> None:
        try:
            release()
        except Exception as err:  # noqa: BLE001 - reported, and the next release still runs
            self.errors.append(f"{what}: {err}")

    def close(self) -> list[str]:
        """Release everything not yet released, newest first; the failures, one line each."""
        if not self.closed:
            self.closed = True
            self._stack.close()
        return self.errors
