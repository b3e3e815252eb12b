"""Who serves what: one blkback per vbd, one writer per image, held as flock(2) locks.

Owns: `lock_vbd` (an exclusive lock on a file named after the vbd, in the lock directory of
the Xen it belongs to, holding the server's pid), `lock_image` (a lock on the image file
itself: exclusive when served writable, shared when read-only or when the user said the
image may be written by several guests, xl's `w!`), `lock_dir`, and `LockError`.
Must not: touch xenstore, the image's content, or another process (a lock refused is
reported with the holder's pid, never broken).

Why flock: the kernel releases it when the process dies, however it dies, so a crashed
blkback never blocks the next one; a lock is per open file, so a second open in the same
process conflicts too. The lock file stays after exit (removing it would let two servers
lock two different files of the same name).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re

from xentools.core.errors import XentoolsError

__all__ = ["REAL_XEN_LOCK_DIR", "LockError", "VbdLock", "holder_pid", "lock_dir", "lock_image", "lock_vbd"]

log = logging.getLogger("xentools.blkback")

REAL_XEN_LOCK_DIR = "/run/xentools/blkback"
_SIM_LOCK_SUBDIR = "blkback-locks"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class LockError(XentoolsError):
    """Another process serves the vbd, or writes the image. One line naming the holder's
    pid and what to do."""


def lock_dir(sim_dir: str | None) -> str:
    """Where the locks of one Xen live: inside the software Xen's directory, or
    /run/xentools/blkback for the real Xen this host runs."""
    if sim_dir:
        return os.path.join(os.path.abspath(sim_dir), _SIM_LOCK_SUBDIR)
    return REAL_XEN_LOCK_DIR


def holder_pid(fd: int) -> int | None:
    """The pid holding a flock on the file open at `fd`, from /proc/locks (None if unknown)."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" marks a waiter)
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == device and fields[4].isdigit() and int(fields[4]) > 0:
            return int(fields[4])
    return None


class VbdLock:
    """The lock on one vbd, held while this object is open (and by the kernel until the
    process exits, however it exits)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1


def lock_vbd(directory: str, backend_path: str) -> VbdLock:
    """Lock the vbd at `backend_path`; LockError "backend.busy" naming the pid that serves
    it already. The lock file holds our pid."""
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as err:
        raise LockError("backend.lock", f"cannot create the lock directory {directory}: {err.strerror}") from None
    name = _UNSAFE.sub("-", backend_path.strip("/")) + ".lock"
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise LockError("backend.lock", f"cannot open the lock file {path}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        try:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockError("backend.lock", f"cannot lock {path}: {err.strerror}") from None
            pid = _pid_in(fd) or holder_pid(fd)
            who = f"blkback pid {pid}" if pid else "another blkback"
            stop = f"stop it first (kill {pid})" if pid else f"stop it first (the lock is {path})"
            raise LockError(
                "backend.busy", f"{backend_path} is already served by {who}; {stop}, or serve another vbd"
            ) from None
        finally:
            os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return VbdLock(path, fd)


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def lock_image(fd: int, path: str, *, writable: bool, shared_writable: bool = False) -> None:
    """Lock the image open at `fd` for as long as `fd` stays open: exclusive when served
    writable, shared when read-only or `shared_writable` (xl's `w!`: served even when
    another process writes it, as the user said). LockError "image.in_use" when another
    process serves it in a conflicting way. A filesystem that
    cannot lock (some network filesystems) is served without the lock, with a log line."""
    exclusive = writable and not shared_writable
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            log.info("%s: cannot lock the image (%s); a second writer would not be refused", path, err.strerror)
            return
        pid = holder_pid(fd)
        who = f"pid {pid}" if pid else "another process"
        if writable and shared_writable:
            log.info("%s is served writable by %s too, as asked (--shared-writable)", path, who)
            return
        if exclusive:
            raise LockError(
                "image.in_use",
                f"{path} is already served by {who}; serve it with --read-only, or with"
                " --shared-writable (xl's w!) if the guests share it knowingly",
            ) from None
        raise LockError(
            "image.in_use", f"{path} is served writable by {who}; stop that server first"
        ) from None
