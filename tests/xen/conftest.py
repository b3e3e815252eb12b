"""The in-dom0 suite: runs only inside dom0 under real Xen (booted by tests/nested/run.py).

Owns: the guard that FAILS every test here with the reason when this is not dom0 on real
Xen with the grant and event channel devices (no skips: a missing Xen is a failure), the
`xen` marker on every test here, the summary line listing every re-run (guests.RERUNS),
and shared fixtures that check nothing leaks.
Must not: start Xen services (tests/nested/dom0/boot.sh did that before pytest started).

Run it with `make test-xen`, or: .venv/bin/python tests/nested/run.py -- .venv/bin/python -m pytest -q tests/xen
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REQUIRED = ("/proc/xen/capabilities", "/dev/xen/gntdev", "/dev/xen/gntalloc", "/dev/xen/evtchn")


def _not_dom0_reason() -> str | None:
    absent = [p for p in REQUIRED if not Path(p).exists()]
    if absent:
        return (
            f"tests/xen runs only in dom0 on real Xen; absent here: {', '.join(absent)}. "
            "Run it through the nested harness: make test-xen"
        )
    if "control_d" not in Path("/proc/xen/capabilities").read_text():
        return "tests/xen runs only in dom0: /proc/xen/capabilities lacks control_d"
    return None


NOT_DOM0 = _not_dom0_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.xen)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Every re-run done because of the emulator (guests.record_rerun), in the summary: a
    re-run hides bugs, so each is shown even when every test passed."""
    import sys

    guests = sys.modules.get("guests")
    reruns = list(getattr(guests, "RERUNS", ()))
    terminalreporter.write_line(f"re-runs (emulator faults, each run again): {len(reruns)}")
    for what in reruns:
        terminalreporter.write_line(f"  RE-RUN {what}")


@pytest.fixture(autouse=True)
def _require_dom0() -> None:
    if NOT_DOM0 is not None:
        pytest.fail(NOT_DOM0, pytrace=False)


@pytest.fixture
def platform():
    from xentools.platform.xen import XenPlatform

    return XenPlatform()


def _closed_without_leaks(handle, held: str, what: str):  # type: ignore[no-untyped-def]
    """Yield `handle`; after the test close it and fail when its `held` collection is not
    empty (the test left `what` behind)."""
    yield handle
    leaked = getattr(handle, held)
    handle.close()
    assert not leaked, f"test left {len(leaked)} {what} behind"


@pytest.fixture
def gntshr(platform):
    yield from _closed_without_leaks(platform.open_gntshr(), "shared", "grant shares")


@pytest.fixture
def gnttab(platform):
    yield from _closed_without_leaks(platform.open_gnttab(), "mapped", "grant mappings")


@pytest.fixture
def evtchn(platform):
    channels = platform.open_evtchn()
    yield channels
    channels.close()
