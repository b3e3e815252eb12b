"""`xentools vbd create|destroy`: the toolstack's part of attaching a disk.

Owns: the command line over xentools.devices.toolstack (both xenstore directories of a vbd
written or removed in one transaction, as the kernel drivers need).
Must not: serve the disk (that is `xentools blkback serve`) or speak blkif.
"""

from __future__ import annotations

import json
import os

import click

from xentools.core.vbd import encode_vbd
from xentools.devices import toolstack
from xentools.platform.select import open_platform


def _common(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="Print the paths as JSON.")(fn)
    fn = click.option("--backend-domid", type=click.IntRange(0, 0x7FEF), default=0,
                      show_default=True)(fn)
    fn = click.option("--userspace-kind", is_flag=True,
                      help=f"Put the backend under backend/{toolstack.USERSPACE_BACKEND_KIND}/ "
                           "where Linux's xen-blkback does not look (for our blkback).")(fn)
    fn = click.option("--vdev", default="xvda", show_default=True,
                      help="Virtual device: xvdX, hdX, sdX, dNpM or a number.")(fn)
    fn = click.option("--frontend-domid", type=click.IntRange(0, 0x7FEF), required=True)(fn)
    fn = click.option("--sim-dir", type=click.Path(file_okay=False), default=None,
                      help="Software Xen directory (else $XENTOOLS_SIM_DIR, else real Xen).")(fn)
    return fn


def _paths(frontend_domid: int, vdev: str, backend_domid: int, userspace_kind: bool):
    devid = encode_vbd(vdev) if not vdev.isdigit() else int(vdev)
    kind = toolstack.USERSPACE_BACKEND_KIND if userspace_kind else toolstack.BLKBACK_KIND
    return devid, toolstack.VbdPaths(
        toolstack.backend_path(backend_domid, frontend_domid, devid, kind),
        toolstack.frontend_path(frontend_domid, devid))


def _echo(paths: toolstack.VbdPaths, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"backend": paths.backend, "frontend": paths.frontend}))
    else:
        click.echo(f"backend  {paths.backend}\nfrontend {paths.frontend}")


@click.group()
def vbd() -> None:
    """Create or remove a vbd's xenstore directories (the toolstack's job)."""


@vbd.command("create")
@_common
@click.option("--image", required=True, help="The `params` key: the image the backend serves.")
@click.option("--read-only", is_flag=True, help="mode=r instead of w.")
def vbd_create(sim_dir, frontend_domid, vdev, userspace_kind, backend_domid, as_json,
               image, read_only) -> None:
    """Write both directories of a vbd in one transaction (state Initialising)."""
    devid, paths = _paths(frontend_domid, vdev, backend_domid, userspace_kind)
    xs = open_platform(sim_dir, backend_domid).open_xenstore()
    try:
        made = toolstack.create_vbd(
            xs, backend_domid=backend_domid, frontend_domid=frontend_domid, devid=devid,
            params=os.path.abspath(image), mode="r" if read_only else "w",
            backend_kind=toolstack.USERSPACE_BACKEND_KIND if userspace_kind
            else toolstack.BLKBACK_KIND)
    finally:
        xs.close()
    assert made == paths
    _echo(made, as_json)


@vbd.command("destroy")
@_common
def vbd_destroy(sim_dir, frontend_domid, vdev, userspace_kind, backend_domid, as_json) -> None:
    """Remove both directories of a vbd in one transaction."""
    _, paths = _paths(frontend_domid, vdev, backend_domid, userspace_kind)
    xs = open_platform(sim_dir, backend_domid).open_xenstore()
    try:
        toolstack.destroy_vbd(xs, paths)
    finally:
        xs.close()
    _echo(paths, as_json)
