"""Fixtures shared by the host tests (pytest loads this file for every test under tests/).

Owns: `xen` (one software Xen per module) and `fresh_xen` (one per test, for tests that stop
its services or need empty xenstore directories), both with the domains the module lists in
`XEN_DOMAINS` (default dom0 and dom1); `xs0` (dom0's xenstore client on `xen`); `backend`
(tests/hostile_backend.py, honest unless told otherwise, in its own process on `xen`);
`sockdir` and `xenstored` (a software xenstored alone, on a short socket path); `grantd`
and `peers` (a grantd alone, and domains in other processes running the module's `PEER`
script with grantd's directory and their domid).
Must not: define hooks or fixtures that change tests/xen (its own conftest.py rules there),
or hold helpers a test runs as a script (those live in tests/support.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from support import Peer, short_tmpdir, start_grantd

from xentools.platform.sim.launcher import SoftwareXen
from xentools.platform.sim.xenstored import spawn_xenstored

DEFAULT_DOMAINS = (0, 1)


def _domains(request: pytest.FixtureRequest) -> tuple[int, ...]:
    return tuple(getattr(request.module, "XEN_DOMAINS", DEFAULT_DOMAINS))


@pytest.fixture(scope="module")
def xen(request: pytest.FixtureRequest) -> Iterator[SoftwareXen]:
    """A software Xen shared by the tests of one module."""
    with SoftwareXen(domains=_domains(request)) as running:
        yield running


@pytest.fixture
def fresh_xen(request: pytest.FixtureRequest) -> Iterator[SoftwareXen]:
    """A software Xen for one test alone."""
    with SoftwareXen(domains=_domains(request)) as running:
        yield running


@pytest.fixture(scope="module")
def xs0(xen: SoftwareXen):  # type: ignore[no-untyped-def]
    client = xen.platform(0).open_xenstore()
    yield client
    client.close()


@pytest.fixture(scope="module")
def backend(xen: SoftwareXen):  # type: ignore[no-untyped-def]
    """The test backend (tests/hostile_backend.py) in its own process, as domain 0 of `xen`."""
    from hostile_backend import BackendProcess

    proc = BackendProcess(xen.root_dir, 0)
    yield proc
    proc.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    # unix socket paths are limited to 107 bytes: keep them short, not under tmp_path.
    with short_tmpdir("xs") as path:
        yield path


@pytest.fixture
def xenstored(sockdir: str) -> Iterator[str]:
    """The socket path of a software xenstored alone; it must exit 0 on SIGTERM."""
    path = os.path.join(sockdir, "socket")
    proc = spawn_xenstored(path)
    yield path
    proc.terminate()
    assert proc.wait(timeout=10) == 0


@pytest.fixture
def grantd():  # type: ignore[no-untyped-def]
    """(directory, process) of a grantd alone (support.start_grantd)."""
    with start_grantd() as running:
        yield running


@pytest.fixture
def peers(request: pytest.FixtureRequest, grantd) -> Iterator[Callable[[int], Peer]]:  # type: ignore[no-untyped-def]
    """make(domid): a Peer running the module's PEER script with (grantd's directory, domid);
    every one is closed after the test."""
    made: list[Peer] = []

    def make(domid: int) -> Peer:
        peer = Peer(request.module.PEER, grantd[0], str(domid))
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()
