"""`xentools sim ...`: run the software Xen's services in the foreground.

Owns: the command-line wiring of the software xenstored, grantd and the whole software Xen,
and `sim wait` (the `ready` file `sim start` writes into DIR once every domain exists).
Must not: implement any service (they live in xentools.platform.sim).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import click

from xentools.core.errors import XentoolsError
from xentools.platform.interface import PlatformError
from xentools.tools.options import AliasOption, sim_dir_option


@click.group()
def sim() -> None:
    """The software Xen: xenstored, grant tables and event channels, without a hypervisor."""


@sim.command("xenstored")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="Unix socket to serve; connections to it act as dom0.")
def sim_xenstored(socket_path: str) -> None:
    """Serve xenstore (xs_wire) on SOCKET until SIGTERM. Xen's C tools and pyxs can use it
    with XENSTORED_PATH=SOCKET; after dom0 introduces domain N, SOCKET.dN acts as domain N."""
    from xentools.platform.sim.xenstored import run_xenstored

    run_xenstored(socket_path)


@sim.command("grantd")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="Unix socket of the grant table and event channel service.")
def sim_grantd(socket_path: str) -> None:
    """Serve grant tables and event channels for simulated domains until SIGTERM."""
    from xentools.platform.sim.grantd import run_grantd

    run_grantd(socket_path)


READY_FILE = "ready"  # written by `sim start` once every domain is introduced


@sim.command("start")
@sim_dir_option("--dir", required=True, help="Directory for the sockets and logs (created if missing).")
@click.option("--domid", "--domain", "domains", cls=AliasOption, multiple=True, type=click.IntRange(1, 32767),
              help="Introduce this domU (repeatable); dom0 always exists.")
def sim_start(sim_dir: str, domains: tuple[int, ...]) -> None:
    """Run a whole software Xen (xenstored + grantd) under DIR until SIGTERM.
    Point other commands at it with --sim-dir DIR or XENTOOLS_SIM_DIR=DIR;
    `xentools sim wait --sim-dir DIR` returns once it is ready."""
    from xentools.platform.sim.launcher import run_software_xen

    os.makedirs(sim_dir, exist_ok=True)
    ready_path = os.path.join(sim_dir, READY_FILE)

    def ready(xen) -> None:
        with open(ready_path + ".tmp", "w") as out:
            json.dump({"pid": os.getpid(), "domains": sorted(xen.domains)}, out)
        os.replace(ready_path + ".tmp", ready_path)
        click.echo(f"sim: software Xen ready in {xen.root_dir} (domains {sorted(xen.domains)}); "
                   f"export XENTOOLS_SIM_DIR={os.path.abspath(xen.root_dir)}", err=True)

    try:
        run_software_xen(sim_dir, (0, *domains), on_ready=ready)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready_path)


@sim.command("wait")
@sim_dir_option()
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="Seconds to wait.")
def sim_wait(sim_dir: str | None, timeout: float) -> None:
    """Wait until the software Xen started with `sim start --sim-dir DIR` is ready (every
    domain introduced), for scripts that start it in the background."""
    from xentools.platform.select import SIM_DIR_ENV
    from xentools.platform.sim.platform import SoftwarePlatform

    sim_dir = sim_dir or os.environ.get(SIM_DIR_ENV)
    if not sim_dir:
        raise click.UsageError(f"give --sim-dir DIR (or set {SIM_DIR_ENV})")
    root = os.path.abspath(sim_dir)
    ready_path = os.path.join(root, READY_FILE)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(ready_path) as f:
                state = json.load(f)
            os.kill(state["pid"], 0)
            SoftwarePlatform(root, 0).open_xenstore(timeout=1.0).close()
        except (OSError, ValueError, KeyError, XentoolsError):
            if time.monotonic() > deadline:
                raise PlatformError(f"sim.not_ready: no software Xen became ready at {root} within "
                                    f"{timeout:g} s: start one with `xentools sim start --sim-dir {root}`") from None
            time.sleep(0.1)
            continue
        click.echo(f"sim: software Xen at {root} is ready (domains {state['domains']})", err=True)
        return
