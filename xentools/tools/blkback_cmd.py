"""`xentools blkback serve`: run the userspace blkback for one vbd in the foreground.

Owns: the click group `blkback` and its `serve` command, the one command line of our blkback
(boot-test, the demo and the tests start it as `python -m xentools blkback serve`), and its
options' mapping onto BackendConfig. Must not: implement the backend (devices/blkback.py
does) or print tracebacks: every expected failure is a XentoolsError, printed by the CLI as
one line with a non-zero exit.

On exit (SIGTERM, SIGINT, the vbd removed) the conformance report is written, as JSON, to
--report FILE (or stdout with --report -); SIGUSR1 writes it again while serving. The image
is the vbd's `params` (--image must name the same file); one blkback serves a vbd, and an
image is served writable once unless --shared-writable (xl's w!).
"""

from __future__ import annotations

import logging
import sys

import click

from xentools.core.features import RING_PAGE_ORDER_LIMIT
from xentools.devices.blkback import BackendConfig, serve
from xentools.devices.blkback_faults import FaultSpecError, help_epilog, help_text, parse_faults
from xentools.devices.blkback_grants import DEFAULT_MAX_PERSISTENT_GRANTS
from xentools.devices.blkback_ringloop import (
    MAP_BUDGET_MIB_RANGE,
    MAP_WINDOW,
    MAP_WINDOWS,
    READS_CHOICES,
    READS_ENV,
    SPIN_ENV,
    SPIN_US,
    SPIN_US_RANGE,
    WINDOWS_SPEEDUP,
    set_map_budget,
    set_reads,
    set_spin,
    xen_spin_from_env,
)
from xentools.tools.options import resolve_disk


@click.group("blkback")
def blkback() -> None:
    """Userspace blkif backend serving RAW image files."""


@blkback.command("serve", epilog=help_epilog())
@click.option("--sim-dir", type=click.Path(file_okay=False), default=None,
              help="Software Xen root directory (default: $XENTOOLS_SIM_DIR, else real Xen).")
@click.option("--backend-path", required=True,
              help="Backend directory, /local/domain/<domid>/backend/vbd/<frontend-domid>/<devid>.")
@click.option("--image", "image_path", default=None, metavar="PATH|DISKSPEC",
              help="RAW image file to serve, or an xl disk spec naming it (target=...); must be the "
                   "vbd's params (default: params).")
@click.option("--read-only", is_flag=True, help="Serve read-only (VDISK_READONLY; writes answered ERROR).")
@click.option("--shared-writable", is_flag=True,
              help="Serve writable even if another server writes the image too (xl's w!).")
@click.option("--max-ring-page-order", type=click.IntRange(0, RING_PAGE_ORDER_LIMIT),
              default=RING_PAGE_ORDER_LIMIT, show_default=True)
@click.option("--max-queues", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--max-indirect-segments", type=click.IntRange(0, 4096), default=256, show_default=True,
              help="feature-max-indirect-segments; 0 disables indirect requests.")
@click.option("--no-persistent", is_flag=True, help="Do not offer feature-persistent.")
@click.option("--no-discard", is_flag=True, help="Do not offer feature-discard (offered by default when the "
                                                 "image is writable and its file system can punch holes).")
@click.option("--sector-size", type=click.Choice(["512", "1024", "2048", "4096"]), default="512",
              show_default=True, help="Logical sector size of the image.")
@click.option("--max-persistent-grants", type=click.IntRange(0, None),
              default=DEFAULT_MAX_PERSISTENT_GRANTS, show_default=True, help="Persistent grants cached per ring.")
@click.option("--map-budget-mib", type=click.IntRange(*MAP_BUDGET_MIB_RANGE), default=MAP_WINDOWS * MAP_WINDOW >> 20,
              show_default=True, help="Image page cache mapped at once to copy reads from, for the whole process.")
@click.option("--reads", type=click.Choice(READS_CHOICES), envvar=READS_ENV, default="auto", show_default=True,
              help="How the compiled loop reads a regular image: copied from mapped windows, preadv straight into "
                   f"the granted pages, or auto: windows only where measured >= {WINDOWS_SPEEDUP:g}x faster (QEMU TCG).")
@click.option("--spin-us", type=click.IntRange(*SPIN_US_RANGE), envvar=SPIN_ENV, default=SPIN_US, show_default=True,
              help="On the software Xen, how long the compiled loop may watch for the frontend's next event "
                   "before it sleeps (adapts between 0 and this; 0: always sleep at once).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the conformance report (JSON) to this file, or - for stdout, on exit and SIGUSR1.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC", help=help_text())
@click.option("--verbose", "-v", is_flag=True, help="Log connections on stderr.")
@click.pass_context
def serve_cmd(
    ctx: click.Context,
    sim_dir: str | None, backend_path: str, image_path: str | None, read_only: bool, shared_writable: bool,
    max_ring_page_order: int, max_queues: int, max_indirect_segments: int, no_persistent: bool, no_discard: bool,
    sector_size: str, max_persistent_grants: int, map_budget_mib: int, reads: str, spin_us: int,
    report_path: str | None, faults: tuple[str, ...], verbose: bool,
) -> None:
    """Serve the vbd at BACKEND_PATH (its params image) until stopped or the vbd is removed."""
    try:
        fault_specs = parse_faults(faults)  # refused before anything is served
        xen_spin_from_env()  # $XENTOOLS_BLKBACK_XEN_SPIN_US: real Xen's watch before a sleep
    except (FaultSpecError, ValueError) as err:
        click.echo(f"xentools: error: {err}", err=True)
        ctx.exit(2)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="blkback: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if image_path is not None:
        disk = resolve_disk(image_path, vdev=None, read_only=read_only)  # a path or an xl disk spec
        image_path, read_only = disk.image, disk.mode == "r"
        shared_writable = shared_writable or disk.access == "w!"
    set_map_budget(map_budget_mib)
    set_reads(reads)
    set_spin(spin_us)
    config = BackendConfig(
        read_only=read_only,
        max_ring_page_order=max_ring_page_order,
        max_queues=max_queues,
        max_indirect_segments=max_indirect_segments,
        persistent=not no_persistent,
        sector_size=int(sector_size),
        max_persistent_grants=max_persistent_grants,
        report_path=report_path,
        shared_writable=shared_writable,
        faults=fault_specs,
        discard=not no_discard,
    )
    serve(sim_dir=sim_dir, backend_path=backend_path, image_path=image_path, config=config)
