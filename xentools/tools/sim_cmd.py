"""`xentools sim ...`: run the software Xen's services in the foreground.

Owns: the command-line wiring of the software xenstored, grantd and the whole software Xen.
Must not: implement any service (they live in xentools.platform.sim).
"""

from __future__ import annotations

import os

import click


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


@sim.command("start")
@click.option("--dir", "root_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the sockets and logs (created if missing).")
@click.option("--domain", "domains", multiple=True, type=click.IntRange(1, 32767),
              help="Introduce this domU (repeatable); dom0 always exists.")
def sim_start(root_dir: str, domains: tuple[int, ...]) -> None:
    """Run a whole software Xen (xenstored + grantd) under DIR until SIGTERM.
    Point other commands at it with --sim-dir DIR or XENTOOLS_SIM_DIR=DIR."""
    from xentools.platform.sim.launcher import run_software_xen

    os.makedirs(root_dir, exist_ok=True)

    def ready(xen) -> None:
        click.echo(f"sim: software Xen ready in {xen.root_dir} (domains {sorted(xen.domains)}); "
                   f"export XENTOOLS_SIM_DIR={xen.root_dir}", err=True)

    run_software_xen(root_dir, (0, *domains), on_ready=ready)
