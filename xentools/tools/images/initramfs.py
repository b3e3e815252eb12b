"""What a Linux guest of this host boots: the host's own Debian kernel and an initramfs.

Owns: the newest installed kernel whose modules are installed (`newest_kernel`: the kernel
the nested harness boots as dom0, and its test guests boot too), and the writer of the "newc"
cpio archive the kernel unpacks as its initramfs (`Cpio`; no cpio binary needed). Users:
tests/nested/run.py (dom0's initramfs) and tests/xen/guests.py (the test guests').
Must not: choose what goes into an initramfs (its callers do) or run anything.
"""

from __future__ import annotations

import stat
from pathlib import Path

__all__ = ["Cpio", "newest_kernel"]


def newest_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> tuple[str, Path] | None:
    """(version, vmlinuz) of the newest boot/vmlinuz-* whose modules/<version>/modules.dep
    exists (a guest or dom0 loads its drivers from there), or None when there is none."""
    found = []
    for vmlinuz in boot.glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if (modules / version / "modules.dep").is_file():
            found.append((version, vmlinuz))
    return max(found, key=lambda kernel: kernel[1].stat().st_mtime, default=None)


class Cpio:
    """Writer of the "newc" cpio format the kernel unpacks as initramfs: entries in the order
    given (a directory before what it holds), then finish() for the archive's bytes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.data += header + name.encode() + b"\0"
        self.data += b"\0" * (-len(self.data) % 4)
        self.data += body
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, body: bytes, executable: bool = False) -> None:
        self._entry(name, stat.S_IFREG | (0o755 if executable else 0o644), body)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)
