"""blkfront's completion thread: the thread that takes responses, and how to stop it.

Owns: `CompletionThread`, one device's completion thread (its identity, so that a callback
can be told it runs there), its stop flag and the self-pipe that wakes its poll() to stop.
The pipe is the thread's own resource: `close()` closes it, once (registered with the
device's Teardown when the device is created).
Must not: take responses, touch rings, grants or xenstore, or take the device lock: the
device's loop (`BlkFront._run`) does the work and runs on this thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

__all__ = ["CompletionThread"]


class CompletionThread:
    """Start with `start(loop)`; `loop()` polls `wake_fd` and returns when `stopping`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopping = False
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self.wake_fd, self._wake_write_fd = os.pipe()
        os.set_blocking(self.wake_fd, False)

    def start(self, loop: Callable[[], None]) -> None:
        def run() -> None:
            self._ident = threading.get_ident()
            loop()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def running_here(self) -> bool:
        """True on the completion thread itself."""
        return self._ident is not None and threading.get_ident() == self._ident

    def take_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_fd, 4096)

    def wake(self) -> None:
        """Wake the loop's poll() now (a stop, or work the loop should look at)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_write_fd, b"x")

    def stop(self, timeout: float) -> None:
        """Ask the loop to return and wait up to `timeout` seconds for it (not when called
        from the thread itself, e.g. by a callback that closes the device)."""
        thread = self._thread
        if thread is None:
            return
        self.stopping = True
        self.wake()
        if thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def close(self) -> None:
        """Close the wake pipe (after `stop`)."""
        fds = (self.wake_fd, self._wake_write_fd)
        self.wake_fd = self._wake_write_fd = -1
        errors: list[OSError] = []
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError as err:
                    errors.append(err)
        if errors:
            raise errors[0]
