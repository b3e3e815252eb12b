"""The compare-and-swap of xentools.platform.barrier, which the software Xen's event channel
words use.

Owns: proof that compare_and_swap32() swaps exactly when the word holds the expected value,
returns the old value either way, touches only its 32-bit word, is made once per process,
and is honestly None on a machine it has no instruction for.
"""

from __future__ import annotations

import ctypes
import platform

from xentools.platform import barrier


def test_compare_and_swap_swaps_only_on_a_match():
    assert platform.machine() == "x86_64", "these tests expect the x86-64 CI machines"
    cas = barrier.compare_and_swap32()
    assert cas is not None and barrier.compare_and_swap32() is cas
    words = (ctypes.c_uint32 * 3)(0xAAAAAAAA, 5, 0xBBBBBBBB)
    middle = ctypes.addressof(words) + 4
    assert cas(middle, 5, 0xFFFFFFFF) == 5 and words[1] == 0xFFFFFFFF
    assert cas(middle, 5, 9) == 0xFFFFFFFF and words[1] == 0xFFFFFFFF  # no match: unchanged
    assert (words[0], words[2]) == (0xAAAAAAAA, 0xBBBBBBBB)


def test_unknown_machine_means_no_compare_and_swap(monkeypatch):
    monkeypatch.setattr(barrier, "_cached_cas", [])
    monkeypatch.setattr(barrier.platform, "machine", lambda: "riscv64")
    assert barrier.compare_and_swap32() is None
