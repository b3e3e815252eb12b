"""The full memory barrier (xentools.platform.barrier) on the host.

Owns: proof that full_barrier() runs a real fence instruction, is made once per process,
and honestly returns None on a machine it has no fence for.
"""

from __future__ import annotations

import platform

from xentools.platform import barrier


def test_full_barrier_runs_an_mfence():
    assert platform.machine() == "x86_64", "these tests expect the x86-64 CI machines"
    fn = barrier.full_barrier()
    assert fn is not None
    fn()
    assert barrier.full_barrier() is fn  # made once per process
    assert barrier.code_bytes() == bytes((0x0F, 0xAE, 0xF0, 0xC3))  # mfence; ret


def test_unknown_machine_means_none(monkeypatch):
    monkeypatch.setattr(barrier, "_cached", [])
    monkeypatch.setattr(barrier.platform, "machine", lambda: "riscv64")
    assert barrier.full_barrier() is None
